"""The training planner: its decisions follow from the data's profile and the measured step times (fixed here by a
fake timer), and every choice yields to a flag; the recipe's resolution rule is flag, else plan, else default."""
import dataclasses

import pytest

from vitkit.data.profile import DataProfile
from vitkit.models import ViTConfig, count_flops
from vitkit.tasks.plan import LADDER, LADDER_EPOCHS, epochs_needed, plan_recipe, stem_channels_for, token_layout
from vitkit.tasks.recipe import DEFAULTS, Recipe, resolve

from ._digits import color_folder


def _profile(n=50_000, side=32, grey=False, asym=0.0, classes=10):
    return DataProfile(num_train=n, num_val=n // 10, num_classes=classes, class_counts=[n // classes] * classes,
                       native_size=(side, side), size_range=(side, side), channels=1 if grey else 3, grey=grey,
                       mean=[0.5] if grey else [0.5] * 3, std=[0.25] if grey else [0.25] * 3, asymmetry=asym)


class FakeTimer:
    """Step time proportional to the candidate's FLOPs at a fixed machine rate; bf16 `bf16_speedup` times faster."""

    def __init__(self, gflops_per_s=150.0, bf16_speedup=2.0, batch=128):
        self.rate, self.bf16, self.batch, self.calls = gflops_per_s * 1e9, bf16_speedup, batch, []

    def __call__(self, fields, precision):
        self.calls.append((fields.get("embed_dim"), fields.get("depth"), precision))
        cfg = ViTConfig.from_dict({**ViTConfig().to_dict(), **fields, "num_classes": 10})
        sec = 3 * count_flops(cfg)["flops"] * self.batch / self.rate
        return sec / self.bf16 if precision == "bf16" else sec


def test_token_layout_from_the_image_size():
    assert token_layout(32) == (32, 4, "conv")  # 8x8 tokens through two stride-2 convs
    assert token_layout(28) == (28, 4, "conv")  # 7x7
    assert token_layout(8) == (8, 2, "conv")  # 4x4
    assert token_layout(64) == (64, 8, "conv")
    assert token_layout(100) == (96, 16, "conv")  # cut to a multiple of the patch


def test_small_images_get_a_full_resolution_conv_before_the_stride_2_convs():
    import torch

    from vitkit import create_model

    assert stem_channels_for(32, 4, "conv", 128) == (32, 64, 128)  # timm's tiers (64, 128) after a stride-1 conv
    assert stem_channels_for(28, 4, "conv", 64) == (16, 32, 64)
    assert stem_channels_for(64, 8, "conv", 128) == ()  # larger images: the tiers alone (its cost grows with area)
    assert stem_channels_for(32, 4, "patch", 128) == ()
    p = plan_recipe(_profile(), Recipe(), budget=3600, timer=FakeTimer(), precisions=("fp32",))
    assert p.recipe.stem_channels == stem_channels_for(32, 4, "conv", p.recipe.embed_dim)
    assert "full-resolution" in p.reasons["input"]
    big = plan_recipe(_profile(side=96, n=5_000), Recipe(), budget=3600, timer=FakeTimer(), precisions=("fp32",))
    assert big.recipe.stem_channels == () and "full-resolution" not in big.reasons["input"]
    # the model it describes: a stride-1 conv keeps 32x32, the next two halve it to the 8x8 token grid
    m = create_model(img_size=32, patch_size=4, embed_dim=p.recipe.embed_dim, depth=1, num_heads=p.recipe.num_heads,
                     stem="conv", stem_channels=p.recipe.stem_channels, num_classes=10)
    convs = [c for c in m.patch_embed.backbone.modules() if isinstance(c, torch.nn.Conv2d)]
    assert [c.stride[0] for c in convs] == [1, 2, 2] and convs[0].out_channels == p.recipe.stem_channels[0]
    assert m.patch_embed(torch.zeros(2, 3, 32, 32)).shape[1:3] == (8, 8)
    # flags win: the user's widths, or () for timm's tiers; a user's width carries the planned stem with it
    mine = plan_recipe(_profile(), Recipe(stem_channels=(16, 48, 96)), budget=3600, timer=FakeTimer())
    assert mine.recipe.stem_channels == (16, 48, 96) and "full-resolution" not in mine.reasons["input"]
    assert plan_recipe(_profile(), Recipe(stem_channels=()), budget=3600, timer=FakeTimer()).recipe.stem_channels == ()
    wide = plan_recipe(_profile(), Recipe(embed_dim=256, depth=2, num_heads=4), budget=3600, timer=FakeTimer())
    assert wide.recipe.stem_channels == (64, 128, 256)
    # the reason names the model the user sized, not the ladder rung it was measured in place of
    assert wide.reasons["model"].startswith("width 256, depth 2, 4 heads (your flags): ")
    assert list(wide.measurements["step_seconds"]) == ["256x2/fp32"]  # and so does the measurement's label


def test_more_budget_buys_a_bigger_model_and_smaller_data_a_smaller_one():
    timer = FakeTimer()
    picks = {}
    budgets = (600, 3 * 3600, 12 * 3600)
    for budget in budgets + (3600,):
        p = plan_recipe(_profile(), Recipe(), budget=budget, timer=timer, precisions=("fp32",))
        picks[budget] = (p.recipe.embed_dim, p.recipe.depth)
        assert p.recipe.img_size == 32 and p.recipe.patch_size == 4 and p.recipe.stem == "conv"
        # the pick is the largest measured rung that gets 1.5x the epochs this data needs
        assert p.measurements["planned_epochs"] >= LADDER_EPOCHS * epochs_needed(50_000) \
            or picks[budget] == LADDER[0][:2]
        if picks[budget] != LADDER[0][:2]:
            assert f"gets >= {LADDER_EPOCHS * epochs_needed(50_000):.0f} epochs" in p.reasons["model"]
    order = [LADDER.index(next(r for r in LADDER if r[:2] == picks[b])) for b in budgets]
    assert order[0] < order[1] < order[2]
    small = plan_recipe(_profile(n=5_000), Recipe(), budget=3600, timer=timer, precisions=("fp32",))
    assert epochs_needed(5_000) > epochs_needed(50_000)
    # a tenth of the images: each epoch is 10x cheaper, but it needs more of them; never a smaller model for less data
    at_3600 = LADDER.index(next(r for r in LADDER if r[:2] == picks[3600]))
    assert LADDER.index(next(r for r in LADDER if r[:2] == (small.recipe.embed_dim, small.recipe.depth))) >= at_3600


def test_a_bigger_model_only_where_it_gets_half_again_the_passes_the_data_needs():
    """Width 96 would get ~38 epochs of 50,000 images here, more than the ~30 they need but under 1.5x that: the
    smaller model's extra passes won such a match side by side (docs/training.md), so the plan keeps width 64."""
    p = plan_recipe(_profile(), Recipe(), budget=3600, timer=FakeTimer(), precisions=("fp32",))
    wider = 3600 * 0.92 / p.measurements["step_seconds"]["96x6/fp32"] * 128 / 50_000
    assert epochs_needed(50_000) < wider < 1.5 * epochs_needed(50_000)
    assert (p.recipe.embed_dim, p.recipe.depth) == (64, 4)
    assert "under 1.5x" not in p.reasons["model"] and "1.5x the ~30 this data needs" in p.reasons["model"]


def test_precision_is_the_fastest_measured():
    fast_bf16 = plan_recipe(_profile(), Recipe(), budget=3600, timer=FakeTimer(bf16_speedup=2.5),
                            precisions=("fp32", "bf16"))
    slow_bf16 = plan_recipe(_profile(), Recipe(), budget=3600, timer=FakeTimer(bf16_speedup=0.8),
                            precisions=("fp32", "bf16"))
    assert fast_bf16.recipe.precision == "bf16" and slow_bf16.recipe.precision == "fp32"
    assert set(fast_bf16.measurements["precision_seconds"]) == {"fp32", "bf16"}
    assert slow_bf16.reasons["precision"].startswith("fp32: the fastest measured (fp32 ")


class WidthTimer(FakeTimer):
    """bf16 slower than fp32 on narrow models (its casts cost more than small matmuls save), faster on wide ones."""

    def __call__(self, fields, precision):
        self.bf16 = 0.8 if fields["embed_dim"] < 96 else 2.0
        return super().__call__(fields, precision)


def test_with_an_hour_each_rung_gets_its_own_fastest_precision():
    timer = WidthTimer(gflops_per_s=100.0)
    p = plan_recipe(_profile(), Recipe(), budget=3600, timer=timer, precisions=("fp32", "bf16"))
    assert p.recipe.embed_dim >= 96 and p.recipe.precision == "bf16"  # in fp32 (the first rung's pick) it would not fit
    chosen = {prec for d, depth, prec in timer.calls if (d, depth) == (p.recipe.embed_dim, p.recipe.depth)}
    assert chosen == {"fp32", "bf16"}
    secs = p.measurements["precision_seconds"]  # the chosen rung's, which the bf16 check is sized on
    assert secs["bf16"] < secs["fp32"] and p.reasons["precision"].startswith("bf16: the fastest measured")
    assert any(k.startswith("64x4/fp32") for k in p.measurements["step_seconds"])
    # a short budget: the first rung's winner is timed on the rest (planning stays a few seconds)
    timer = WidthTimer(gflops_per_s=100.0)
    short = plan_recipe(_profile(), Recipe(), budget=1200, timer=timer, precisions=("fp32", "bf16"))
    assert short.recipe.precision == "fp32" and {c[2] for c in timer.calls if c[0] != 64} == {"fp32"}


def test_the_data_decides_channels_flips_and_test_time_flips():
    digits = plan_recipe(_profile(side=28, grey=True, asym=0.65), Recipe(), budget=600, timer=FakeTimer())
    photos = plan_recipe(_profile(side=32, asym=0.01), Recipe(), budget=600, timer=FakeTimer())
    assert digits.recipe.in_chans == 1 and not digits.recipe.hflip and not digits.recipe.tta_flip
    assert photos.recipe.in_chans == 3 and photos.recipe.hflip and photos.recipe.tta_flip
    assert "no flips" in digits.reasons["augment"]
    big = plan_recipe(_profile(n=5_000, side=400), Recipe(), budget=600, timer=FakeTimer())
    assert big.recipe.img_size == 64 and big.recipe.patch_size == 8  # large photos: the budget caps the resolution
    longer = plan_recipe(_profile(n=5_000, side=400), Recipe(), budget=2 * 3600, timer=FakeTimer())
    assert longer.recipe.img_size == 128


def test_test_time_views_are_planned_with_the_augmentation_and_yield_to_flags():
    """The image and its centre enlarged 1.1x and 1.2x (each mirrored for mirror-symmetric data); none besides the
    image where training does not augment; flags decide over the plan."""
    photos = plan_recipe(_profile(side=32, asym=0.01), Recipe(), budget=600, timer=FakeTimer())
    digits = plan_recipe(_profile(side=28, grey=True, asym=0.65), Recipe(), budget=600, timer=FakeTimer())
    assert photos.recipe.tta_zoom == digits.recipe.tta_zoom == (1.1, 1.2)
    assert photos.recipe.tta_shift == digits.recipe.tta_shift == 0
    assert "mirror image and its centre enlarged 1.1x, 1.2x (6 views)" in photos.reasons["evaluate"]
    assert "centre enlarged 1.1x, 1.2x (3 views)" in digits.reasons["evaluate"]
    assert "mirror" not in digits.reasons["evaluate"]
    still = plan_recipe(_profile(side=32, asym=0.01), Recipe(augment="none"), budget=600, timer=FakeTimer())
    assert still.recipe.tta_zoom == () and "enlarged" not in still.reasons["evaluate"]
    named = plan_recipe(_profile(side=32), Recipe(model="vit_tiny_patch16_224"), budget=None, timer=FakeTimer(),
                        fixed_fields={"img_size": 224})
    assert named.recipe.tta_zoom == (1.1, 1.2)
    tuned = plan_recipe(_profile(side=32, asym=0.01), Recipe(), budget=None, timer=FakeTimer(),
                        init={"patch_size": 16, "img_size": 224, "depth": 12})
    assert tuned.recipe.tta_zoom == (1.1, 1.2) and "enlarged" in tuned.reasons["evaluate"]
    final, sources = resolve(Recipe(tta_zoom=(), tta_shift=2), photos.recipe)
    assert final.tta_zoom == () and final.tta_shift == 2 and sources["tta_zoom"] == sources["tta_shift"] == "flag"


def test_a_reason_says_which_of_its_choices_a_flag_overrode():
    """The plan's words stay (what it would have chosen), followed by the value each flag put in their place; reasons
    no flag touched are unchanged."""
    p = plan_recipe(_profile(side=32, asym=0.01), Recipe(), budget=600, timer=FakeTimer())
    before = dict(p.reasons)
    user = Recipe(lr=1e-4, ema_decay=0.0, tta_zoom=(), tta_shift=2, hflip=False)
    final, sources = resolve(user, p.recipe)
    p.note_flags(final, sources)
    assert p.reasons["optimiser"] == before["optimiser"] + " — overridden by your flags: lr 0.0001, ema_decay 0"
    assert p.reasons["augment"] == before["augment"] + " — overridden by your flags: hflip off"
    assert p.reasons["evaluate"].endswith("overridden by your flags: tta_shift 2, tta_zoom none")
    assert all(p.reasons[k] == before[k] for k in before if k not in ("optimiser", "augment", "evaluate"))
    untouched = plan_recipe(_profile(side=32, asym=0.01), Recipe(), budget=600, timer=FakeTimer())
    untouched.note_flags(*resolve(Recipe(), untouched.recipe))
    assert untouched.reasons == before

def test_augmentation_grows_with_the_epochs_the_budget_buys():
    timer = FakeTimer(gflops_per_s=20.0)
    levels = [plan_recipe(_profile(n=n), Recipe(batch_size=128), budget=3600, timer=timer)
              for n in (50_000, 2_000, 200)]
    strength = {"light": 0, "default": 1, "strong": 2}
    s = [strength[p.recipe.augment] for p in levels]
    assert s == sorted(s) and s[0] < s[-1]
    # so many passes that even the largest model would see the data 3x more than it needs: MixUp/CutMix, ramped in
    lavish = plan_recipe(_profile(n=200), Recipe(), budget=20 * 3600, timer=FakeTimer(gflops_per_s=20, batch=16))
    assert lavish.recipe.augment == "strong" and lavish.recipe.mixup > 0 and lavish.recipe.aug_ramp
    assert lavish.recipe.drop_path_rate > 0


def test_flags_win_and_an_epoch_schedule_is_planned_without_measuring_models():
    timer = FakeTimer()
    p = plan_recipe(_profile(), Recipe(embed_dim=96, lr=5e-4, epochs=3), budget=None, timer=timer,
                    precisions=("fp32", "bf16"))
    final, sources = resolve(Recipe(embed_dim=96, lr=5e-4, epochs=3), p.recipe)
    assert final.embed_dim == 96 and final.lr == 5e-4 and final.epochs == 3
    assert sources["embed_dim"] == sources["lr"] == "flag" and sources["depth"] == "plan"
    assert timer.calls == []  # nothing measured: no budget to spend the speed on
    assert p.recipe.precision == "fp32" and "same seed gives the same numbers" in p.reasons["precision"]
    named = plan_recipe(_profile(side=28, grey=True, asym=0.6), Recipe(model="vit_micro_patch7_28"), budget=300,
                        timer=FakeTimer(), fixed_fields=ViTConfig.from_dict(
                            {**ViTConfig().to_dict(), "embed_dim": 64, "depth": 6, "num_heads": 4, "img_size": 28,
                             "patch_size": 7, "in_chans": 1}).to_dict())
    assert named.recipe.embed_dim is None and named.recipe.img_size is None  # the named model keeps its layout
    assert named.recipe.precision in ("fp32", "bf16") and "your choice" in named.reasons["model"]


def test_fine_tuning_keeps_the_architecture_and_plans_gently():
    init = ViTConfig(embed_dim=192, depth=12, num_heads=3, img_size=224, patch_size=16).to_dict()
    p = plan_recipe(_profile(n=2_000, side=300), Recipe(), budget=3600, timer=FakeTimer(gflops_per_s=200),
                    init=init)
    r = p.recipe
    assert r.embed_dim is None and r.depth is None  # the checkpoint's
    assert r.layer_decay and r.lr < 1e-3 and r.mixup == 0.0 and r.img_size % 16 == 0
    slow = plan_recipe(_profile(n=2_000, side=300), Recipe(), budget=600, timer=FakeTimer(gflops_per_s=2),
                       init=init)
    assert slow.recipe.img_size < r.img_size  # too slow at full size for a few epochs: a lower resolution


def test_resolve_is_flag_then_plan_then_default():
    user, plan = Recipe(lr=1.0), Recipe(lr=2.0, batch_size=64)
    final, sources = resolve(user, plan)
    assert (final.lr, final.batch_size, final.weight_decay) == (1.0, 64, DEFAULTS.weight_decay)
    assert (sources["lr"], sources["batch_size"], sources["weight_decay"]) == ("flag", "plan", "default")
    assert Recipe.from_dict(final.to_dict()) == final
    with pytest.raises(ValueError, match="unknown recipe field"):
        Recipe.from_dict({"learning_rate": 1})


# ---- end to end: the whole command inside its budget, the plan recorded and repeatable ------------------------------
def _folder(root):
    return color_folder(root, n=24, size=16, ext="png")


def test_a_budget_covers_the_whole_command_scan_and_report_included(tmp_path, monkeypatch):
    """A fake clock that moves 5 s while the folder is scanned, 1 s per training step, 2 s per evaluation: the run
    plans around all of it and ends — final report included — inside its 60-s budget, having used most of it."""
    import vitkit.data as vdata
    import vitkit.tasks.classify as classify
    import vitkit.train.probe as probe
    from vitkit.train import Trainer, TrainConfig

    now = [0.0]
    monkeypatch.setattr(Trainer, "clock", staticmethod(lambda: now[0]))
    real_open, real_eval, real_loss = vdata.open_data, classify.evaluate, classify.classification_loss

    def slow_open(*a, **k):
        now[0] += 5.0
        return real_open(*a, **k)

    def slow_eval(*a, **k):
        now[0] += 2.0
        return real_eval(*a, **k)

    def slow_loss(ls):
        fn = real_loss(ls)

        def loss_fn(m, batch):
            now[0] += 1.0
            return fn(m, batch)
        return loss_fn

    monkeypatch.setattr(vdata, "open_data", slow_open)
    monkeypatch.setattr(classify, "evaluate", slow_eval)
    monkeypatch.setattr(classify, "classification_loss", slow_loss)
    # the planner's step timer too: its choices (precision, and with it the bf16 check's steps) must not follow
    # how fast or busy this machine is
    slow = FakeTimer(gflops_per_s=1.0, bf16_speedup=0.5)  # the smallest model, fp32: a few real seconds of steps
    monkeypatch.setattr(probe, "step_seconds", lambda net, *a, precision="fp32", **k: slow(net.config.to_dict(),
                                                                                             precision))
    data = _folder(tmp_path / "d")
    task = classify.ClassifierConfig(data=data, val_split=0.25)
    s = classify.train_classifier(task, TrainConfig(name="b", runs_dir=str(tmp_path), time_budget=60.0, quiet=True))
    assert now[0] <= 60.0  # scan, planning, every step and evaluation and the final report: inside the budget
    assert now[0] >= 60.0 - (s["steps"] / s["epochs"] + 2 + 3)  # and not much of it left unused
    assert s["budget_seconds"] <= 60.0
    cfg = __import__("json").loads((tmp_path / "b" / "config.json").read_text())
    rec = cfg["recipe"]
    assert rec["sources"]["time_budget"] == "default" or rec["values"]["time_budget"] == 60.0
    assert rec["values"]["stem"] == "conv" and rec["values"]["img_size"] == 16 and rec["reasons"]["model"]
    assert cfg["profile"]["mirror_symmetric"] is True and rec["values"]["hflip"] is True


def test_train_cli_with_the_auto_recipe_on_a_tiny_folder_and_a_rerun_of_its_recipe(tmp_path, capsys):
    import json

    from vitkit.cli import main

    data = _folder(tmp_path / "colors")
    assert main(["train", "--data", data, "--epochs", "3", "--val-split", "0.25", "--runs-dir", str(tmp_path / "r"),
                 "--name", "auto", "--quiet", "--json"]) == 0
    s = json.loads(capsys.readouterr().out)
    assert s["eval"]["top1"] >= 90 and s["epochs"] == 3  # red vs blue noise: easy, chance is 50%
    cfg = json.loads((tmp_path / "r" / "auto" / "config.json").read_text())
    values, sources = cfg["recipe"]["values"], cfg["recipe"]["sources"]
    assert sources["epochs"] == "flag" and sources["embed_dim"] == "plan" and values["precision"] in ("fp32", "bf16")
    assert cfg["model"]["embed_dim"] == values["embed_dim"] and cfg["model"]["stem"] == values["stem"]
    # the planned test-time views go into the checkpoint, where `vitkit eval` and `predict` read them
    from vitkit.io.checkpoint import read_pretrained_cfg

    pcfg = read_pretrained_cfg(tmp_path / "r" / "auto" / "best.safetensors")
    assert values["tta_zoom"] == pcfg["tta_zoom"] == [1.1, 1.2] and pcfg["tta_flip"] == values["tta_flip"]
    assert values["tta_shift"] == pcfg["tta_shift"] == 0
    assert cfg["eval_views"] == (6 if values["tta_flip"] else 3)  # what the budget counts per evaluated image
    # small images: a full-resolution conv, then one stride-2 conv per halving of the patch
    halvings = values["patch_size"].bit_length() - 1
    assert cfg["model"]["stem_channels"] == values["stem_channels"] and len(values["stem_channels"]) == halvings + 1
    # a rerun from the folder repeats the recipe exactly (flags may still override a field)
    assert main(["train", "--data", data, "--recipe", str(tmp_path / "r" / "auto"), "--lr", "1e-3",
                 "--val-split", "0.25", "--runs-dir", str(tmp_path / "r"), "--name", "again", "--quiet"]) == 0
    again = json.loads((tmp_path / "r" / "again" / "config.json").read_text())["recipe"]
    assert again["values"] == {**values, "lr": 1e-3}
    assert again["sources"]["embed_dim"] == "flag" and again["sources"]["lr"] == "flag"


def test_compile_is_measured_only_where_the_budget_can_pay_for_it():
    calls = []

    def compile_timer(fields, precision, speedup=1.5, cost=60.0):
        calls.append(fields["embed_dim"])
        return FakeTimer()(fields, precision) / speedup, cost

    short = plan_recipe(_profile(), Recipe(), budget=600, timer=FakeTimer(), compile_timer=compile_timer)
    assert calls == [] and short.recipe.compile is None  # 10 minutes: not worth measuring
    long = plan_recipe(_profile(), Recipe(), budget=3600, timer=FakeTimer(), compile_timer=compile_timer)
    assert calls == [long.recipe.embed_dim] and long.recipe.compile is True and "pays off" in long.reasons["compile"]
    slow = plan_recipe(_profile(), Recipe(), budget=3600, timer=FakeTimer(),
                       compile_timer=lambda f, p: compile_timer(f, p, speedup=1.02))
    assert slow.recipe.compile is False and "not worth it" in slow.reasons["compile"]
    fixed = plan_recipe(_profile(), Recipe(compile=False), budget=3600, timer=FakeTimer(),
                        compile_timer=compile_timer)
    assert fixed.recipe.compile is None and len(calls) == 2  # the user decided: nothing more measured
