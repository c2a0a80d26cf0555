"""The training engine: resume, NaN guard, time budget, run folders, optimizer groups, another model type."""
import dataclasses
import json

import pytest
import torch
from safetensors.torch import load_file
from torch import nn

import vitkit
from _runs import Interrupt, stop_after, tiny_task, tiny_tc
from vitkit.data import build_datasets
from vitkit.errors import RunExistsError
from vitkit.tasks.classify import train_classifier
from vitkit.train import (Trainer, TrainConfig, TrainingDiverged, lr_at, param_groups, parse_duration,
                          read_metrics)

TINY = {"embed_dim": 32, "depth": 2, "num_heads": 2, "global_pool": "avg"}


def _task(**kw):
    return tiny_task(**{"model_args": TINY, "max_train": 256, "max_val": 100, **kw})


def _tc(tmp_path, name, **kw):
    return tiny_tc(tmp_path, name, **{"epochs": 3, **kw})


def test_resume_ends_bit_identical_to_an_uninterrupted_run(tmp_path):
    task = _task(model_args=dict(TINY, drop_path_rate=0.2), mixup=0.5)  # random drop-path and mixup: RNG matters
    full = train_classifier(task, _tc(tmp_path, "full", ema_decay=0.9))

    with pytest.raises(Interrupt):
        train_classifier(task, _tc(tmp_path, "cut", ema_decay=0.9), on_epoch_end=stop_after(1))
    assert read_metrics(tmp_path / "cut" / "metrics.csv")[-1]["epoch"] == 1
    again = train_classifier(task, TrainConfig(resume=str(tmp_path / "cut"), quiet=True))
    assert again["steps"] == full["steps"] == 12
    a = load_file(str(tmp_path / "full" / "last.safetensors"))
    b = load_file(str(tmp_path / "cut" / "last.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    sa = torch.load(tmp_path / "full" / "last.state.pt", weights_only=True)
    sb = torch.load(tmp_path / "cut" / "last.state.pt", weights_only=True)
    assert all(torch.equal(sa["model"][k], sb["model"][k]) for k in sa["model"])
    ra, rb = read_metrics(tmp_path / "full" / "metrics.csv"), read_metrics(tmp_path / "cut" / "metrics.csv")
    assert [r["top1"] for r in ra] == [r["top1"] for r in rb]
    # a finished run does not resume
    with pytest.raises(vitkit.ConfigError, match="finished already"):
        train_classifier(task, TrainConfig(resume=str(tmp_path / "full"), quiet=True))


def test_nan_loss_stops_naming_the_step_and_keeps_the_last_checkpoint(tmp_path):
    train, val, _ = build_datasets("mnist5k", max_train=128, max_val=50)
    model = vitkit.create_model("vit_mini_patch7_28", **TINY)
    calls = {"n": 0}

    def loss_fn(m, batch):
        calls["n"] += 1
        x, y = batch
        loss = nn.functional.cross_entropy(m(x), y)
        return (loss * float("nan") if calls["n"] == 3 else loss), {}

    cfg = _tc(tmp_path, "nan", epochs=4)
    with pytest.raises(TrainingDiverged, match=r"loss became nan at step 3 \(epoch 2\).*last good checkpoint"):
        Trainer(model, train, cfg, loss_fn, lambda m: {"top1": 1.0}).fit()
    saved = vitkit.load(tmp_path / "nan" / "last.safetensors")  # epoch 1's weights, whole and finite
    assert all(torch.isfinite(p).all() for p in saved.parameters())


def test_nan_advice_names_only_changes_not_made_already(tmp_path):
    """The NaN guard's advice: no `--precision fp32` for a run in fp32; `turn --clip-grad on` when it is off."""
    train, _, _ = build_datasets("mnist5k", max_train=64, max_val=20)

    def nan_loss(m, batch):
        return nn.functional.cross_entropy(m(batch[0]), batch[1]) * float("nan"), {}

    for kw, said, unsaid in [({}, "keep --clip-grad on", "--precision"),
                             ({"clip_grad": 0.0}, "turn --clip-grad on", "--precision"),
                             ({"precision": "bf16"}, "use --precision fp32", "turn --clip-grad")]:
        model = vitkit.create_model("vit_mini_patch7_28", **TINY)
        with pytest.raises(TrainingDiverged) as e:
            Trainer(model, train, _tc(tmp_path, f"nan{len(kw)}{kw.get('precision', '')}", overwrite=True, **kw),
                    nan_loss).fit()
        assert said in str(e.value) and unsaid not in str(e.value), str(e.value)


@pytest.mark.parametrize("field,value,match", [
    ("max_steps", 0, "max_steps must be >= 1, got 0"), ("batch_size", 0, "batch_size must be >= 1, got 0"),
    ("accum_steps", -1, "accum_steps must be >= 1"), ("epochs", 0, "epochs must be >= 1"),
    ("eval_every", 0, "eval_every must be >= 1"), ("weight_decay", -0.1, "weight_decay must be >= 0"),
    ("lr", 0.0, "lr must be > 0"), ("lr", float("nan"), "lr must be a number"), ("min_lr", -1, "min_lr"),
    ("warmup", -1, "warmup must be >= 0"), ("clip_grad", -1, "clip_grad must be >= 0"),
    ("ema_decay", 1.0, r"ema_decay must be in \[0, 1\)"), ("layer_decay", 0, r"layer_decay must be in \(0, 1\]"),
    ("precision", "fp64", "precision must be 'fp32', 'bf16' or 'fp16'"), ("name", "", "name must be a plain"),
    ("name", "a/b", "name must be a plain"), ("name", "x" * 300, "at most 255 bytes"),
    ("seed", -1, "seed must be between 0 and"), ("device", "banana", "device must be auto, cpu, cuda"),
    ("workers", -1, "workers must be >= 0"), ("time_budget", 0, "time_budget must be > 0"),
    ("batch_size", 2.5, "batch_size must be a whole number"), ("batch_size", True, "batch_size must be a whole")])
def test_train_config_checks_each_field_by_name(field, value, match):
    """Each engine option is checked where the config is made (not at the first step), in one line naming it."""
    with pytest.raises(vitkit.ConfigError, match=match) as e:
        TrainConfig(**{field: value})
    assert e.value.field == field and "\n" not in str(e.value)


def test_accumulation_longer_than_an_epoch_is_an_error_not_an_endless_loop(tmp_path):
    """Under 9 batches per epoch and a step every 9 of them: no step would ever happen, epoch after epoch."""
    with pytest.raises(vitkit.ConfigError, match=r"accum_steps 9 is more than the \d batch"):
        train_classifier(_task(max_train=64), _tc(tmp_path, "acc", batch_size=8, accum_steps=9, epochs=2))


def test_run_folder_is_never_overwritten_without_asking(tmp_path):
    tc = _tc(tmp_path, "once", epochs=1, max_steps=1)
    train_classifier(_task(), tc)
    before = (tmp_path / "once" / "last.safetensors").read_bytes()
    with pytest.raises(RunExistsError, match="--overwrite"):
        train_classifier(_task(), tc)
    assert (tmp_path / "once" / "last.safetensors").read_bytes() == before
    (tmp_path / "notarun").mkdir()
    (tmp_path / "notarun" / "precious.txt").write_text("keep me")
    with pytest.raises(RunExistsError, match="refusing to delete"):
        train_classifier(_task(), dataclasses.replace(tc, name="notarun", overwrite=True))
    assert (tmp_path / "notarun" / "precious.txt").read_text() == "keep me"
    cfg = json.loads((tmp_path / "once" / "config.json").read_text())
    assert cfg["train"]["batch_size"] == 64 and cfg["model"]["embed_dim"] == 32 and cfg["data"]["num_train"] == 256


def test_weight_decay_only_on_matrices_and_layer_decay():
    model = vitkit.create_model("vit_mini_patch7_28", **TINY)
    names = {id(p): n for n, p in model.named_parameters()}
    groups = param_groups(model, 0.05)
    decayed = {names[id(p)] for g in groups if g["weight_decay"] > 0 for p in g["params"]}
    assert "blocks.0.attn.qkv.weight" in decayed and "patch_embed.proj.weight" in decayed
    for n in ("pos_embed", "cls_token", "blocks.0.norm1.weight", "blocks.0.attn.qkv.bias", "head.bias"):
        assert n not in decayed
    scales = {names[id(p)]: g["lr_scale"] for g in param_groups(model, 0.05, layer_decay=0.5) for p in g["params"]}
    assert scales["head.weight"] == 1.0 and scales["blocks.1.mlp.fc1.weight"] == 0.5
    assert scales["blocks.0.mlp.fc1.weight"] == 0.25 and scales["pos_embed"] == 0.125


def test_schedule_and_durations():
    lrs = [lr_at(s, 100, 10, 1.0, 0.0) for s in range(100)]
    assert lrs[0] == pytest.approx(0.1) and lrs[9] == pytest.approx(1.0) and max(lrs) == 1.0
    assert lrs[55] == pytest.approx(0.5, abs=0.02) and lrs[-1] < 0.001
    assert parse_duration("90s") == 90 and parse_duration("10m") == 600 and parse_duration("1h30m") == 5400
    assert parse_duration("2.5") == 2.5
    with pytest.raises(ValueError, match="10m"):
        parse_duration("ten minutes")


@dataclasses.dataclass(frozen=True)
class AEConfig:
    dim: int = 8
    img_size: int = 28  # what vitkit.save records as the input size of any model type
    in_chans: int = 1

    def to_dict(self):
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d):
        return cls(**d)


class TinyAE(nn.Module):
    """A stand-in for MAE/DiT: another model type, another loss, a 'lower is better' metric."""

    def __init__(self, config=AEConfig()):
        super().__init__()
        self.config = config
        self.enc, self.dec = nn.Linear(784, config.dim), nn.Linear(config.dim, 784)

    def forward(self, x):
        return self.dec(torch.relu(self.enc(x.flatten(1)))).view_as(x)


def test_engine_trains_another_model_type_with_its_own_loss(tmp_path):
    vitkit.io.register_model_type("tiny_ae", AEConfig, TinyAE)
    train, val, _ = build_datasets("mnist5k", max_train=256, max_val=64, augment="none")
    val_x = next(iter(vitkit.data.make_loader(val, 64, train=False)))[0]

    def loss_fn(m, batch):
        x, _ = batch
        return nn.functional.mse_loss(m(x), x), {}

    def eval_fn(m):
        return {"val_loss": nn.functional.mse_loss(m(val_x), val_x).item()}

    cfg = _tc(tmp_path, "ae", epochs=4, best_metric="val_loss", best_mode="min", lr=1e-2)
    s = Trainer(TinyAE(), train, cfg, loss_fn, eval_fn, resolved={"task": "tiny_ae"}).fit()
    rows = read_metrics(tmp_path / "ae" / "metrics.csv")
    assert rows[-1]["val_loss"] < rows[0]["val_loss"] and s["best"] == pytest.approx(min(r["val_loss"] for r in rows), rel=1e-5)
    back = vitkit.load(tmp_path / "ae" / "best.safetensors")
    assert isinstance(back, TinyAE)


@pytest.mark.parametrize("every,step_s,eval_s,steps,epochs,seconds,evals", [
    # the plan: (budget - the final evaluation with its 1.2x margin) / (a step + an evaluation spread over an epoch's
    # 8 steps) steps:
    (1, 1.0, 3.0, 70, 9, 97.0, 9),    # (100 - 3.6) / (1 + 3/8) = 70.1; it ends at 70 x 1 s + 9 evaluations x 3 s
    (1, 1.0, 12.0, 34, 5, 94.0, 5),   # evaluations far slower than the first guess: re-planned after the first one,
                                      # (100 - 14.4) / (1 + 12/8) = 34.2
    # the default under a budget: after epoch 1 (8 s + 3 s), every ceil(3 / (0.03 x 8)) = 13 epochs, so only the
    # final one is left: first 8 + (100 - 11 - 3) / (1 + 3/13/8) = 91 steps, then re-planned each epoch as the
    # evaluations that no longer fall in the schedule hand their time back: 93 x 1 s + 2 evaluations x 3 s
    (None, 1.0, 3.0, 93, 12, 99.0, 2),
])
def test_time_budget_lays_the_schedule_over_the_clock(tmp_path, every, step_s, eval_s, steps, epochs, seconds,
                                                      evals):
    """A fake clock that moves only in the loss (a step) and the evaluation: the plan is exact arithmetic."""
    vitkit.io.register_model_type("tiny_ae", AEConfig, TinyAE)
    now = [0.0]
    batches = [torch.randn(4, 1, 28, 28) for _ in range(8)]

    def loss_fn(m, x):
        now[0] += step_s
        return nn.functional.mse_loss(m(x), x), {}

    def eval_fn(m):
        now[0] += eval_s
        return {"val_loss": 1.0}

    cfg = _tc(tmp_path, "budget", epochs=1000, time_budget=100.0, batch_size=4, lr=1e-2, best_metric="",
              eval_every=every)
    trainer = Trainer(TinyAE(), lambda epoch, rank, world: batches, cfg, loss_fn, eval_fn)
    trainer.clock = lambda: now[0]
    s = trainer.fit()
    assert (s["steps"], s["planned_steps"], s["epochs"]) == (steps, steps, epochs)
    assert s["train_seconds"] == seconds <= 100.0  # the final evaluation ends inside the budget...
    assert 100.0 - seconds < 8 * step_s + eval_s  # ...with less than an epoch of it left unused
    rows = read_metrics(tmp_path / "budget" / "metrics.csv")
    assert len(rows) == epochs and rows[-1]["eval_seconds"] == eval_s  # a row (and a checkpoint) every epoch
    assert sum(r["val_loss"] != "" for r in rows) == evals and rows[0]["val_loss"] == 1
    # the cosine was laid over the budget: still high a third of the way in, at the floor by the end
    assert next(r for r in rows if r["step"] >= steps / 3)["lr"] > 0.5e-2 and rows[-1]["lr"] < 1e-4


def test_the_final_evaluation_fits_when_the_machine_slows_down(tmp_path):
    """Steps and evaluations get 2x slower after epoch 2: the last evaluation measured (epoch 1's, 3 s) no longer
    says what the final one costs (6 s). The budget scales it by the steps' slow-down (and its margin), so the
    command still ends inside the budget; keeping only the 3 s measured ran 2 s past it."""
    vitkit.io.register_model_type("tiny_ae", AEConfig, TinyAE)
    now, done = [0.0], [0]
    batches = [torch.randn(4, 1, 28, 28) for _ in range(8)]
    slow = lambda: 2.0 if done[0] > 16 else 1.0  # noqa: E731

    def loss_fn(m, x):
        done[0] += 1
        now[0] += slow()
        return nn.functional.mse_loss(m(x), x), {}

    def eval_fn(m):
        now[0] += 3.0 * slow()
        return {"val_loss": 1.0}

    cfg = _tc(tmp_path, "slowdown", epochs=1000, time_budget=100.0, batch_size=4, lr=1e-2, best_metric="")
    trainer = Trainer(TinyAE(), lambda epoch, rank, world: batches, cfg, loss_fn, eval_fn)
    trainer.clock = lambda: now[0]
    s = trainer.fit()
    rows = read_metrics(tmp_path / "slowdown" / "metrics.csv")
    assert rows[-1]["eval_seconds"] == 6.0 and sum(r["val_loss"] != "" for r in rows) == 2  # epoch 1 and the end
    assert s["train_seconds"] <= 100.0 and 100.0 - s["train_seconds"] < 8 * 2.0 + 6.0 * 1.2 * 2


def test_a_re_plan_carries_the_cosine_on_when_the_machine_speeds_up(tmp_path, monkeypatch):
    """Steps get 4x faster after 24 of them: the budget's re-plans add steps, and the lr goes on down from where it
    stood to the floor at the new end; stretching the cosine over the new total would raise it again mid-run."""
    vitkit.io.register_model_type("tiny_ae", AEConfig, TinyAE)
    now, done, lrs = [0.0], [0], []
    batches = [torch.randn(4, 1, 28, 28) for _ in range(8)]

    def loss_fn(m, x):
        done[0] += 1
        now[0] += 1.0 if done[0] <= 24 else 0.25
        return nn.functional.mse_loss(m(x), x), {}

    def eval_fn(m):
        now[0] += 0.5
        return {"val_loss": 1.0}

    real_set_lr = vitkit.train.engine.set_lr
    monkeypatch.setattr(vitkit.train.engine, "set_lr", lambda opt, lr: (lrs.append(lr), real_set_lr(opt, lr)))
    cfg = _tc(tmp_path, "speedup", epochs=1000, time_budget=100.0, batch_size=4, lr=1e-2, min_lr=1e-5,
              best_metric="", eval_every=1)
    trainer = Trainer(TinyAE(), lambda epoch, rank, world: batches, cfg, loss_fn, eval_fn)
    trainer.clock = lambda: now[0]
    s = trainer.fit()
    warmup, (s0, p0) = trainer.plan["warmup"], trainer.plan["anchor"]
    assert s["steps"] > 100 and 0 < p0 < 1 and s0 > warmup  # re-planned mid-cosine for the faster steps
    after = lrs[warmup:]
    assert all(b <= a + 1e-12 for a, b in zip(after, after[1:])), max(b - a for a, b in zip(after, after[1:]))
    assert lrs[-1] == pytest.approx(lr_at(s["steps"] - 1, s["steps"], warmup, 1e-2, 1e-5, (s0, p0)))
    assert lrs[-1] < 1e-4  # at the floor by the new end


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_precision_and_accumulation_train(tmp_path, precision):
    s = train_classifier(_task(max_train=128, max_val=50),
                         _tc(tmp_path, precision, epochs=1, batch_size=32, accum_steps=2, precision=precision))
    assert s["steps"] == 2  # 4 batches of 32, one optimizer step per 2
    model = vitkit.load(tmp_path / precision / "last.safetensors")
    assert all(torch.isfinite(p).all() and p.dtype == torch.float32 for p in model.parameters())


def test_fine_tune_from_a_run_with_layer_decay(tmp_path):
    train_classifier(_task(), _tc(tmp_path, "pre", epochs=1, max_steps=2))
    s = train_classifier(_task(init=str(tmp_path / "pre"), data="digits", model_args={"img_size": 28}),
                         _tc(tmp_path, "ft", epochs=1, max_steps=2, layer_decay=0.75))
    cfg = json.loads((tmp_path / "ft" / "config.json").read_text())
    assert cfg["model"]["embed_dim"] == 32 and cfg["data"]["spec"] == "digits" and s["steps"] == 2


def test_fit_steps_accounts_for_dearer_late_steps():
    from vitkit.train.budget import fit_steps

    assert fit_steps(0, 100.0, 1.0, 0.0, lambda p: 1.0) == 100
    assert fit_steps(40, 60.0, 1.0, 0.0, lambda p: 1.0) == 100  # 60 more steps of 1 s
    # the last half of the schedule costs twice as much: T/2 * 1 + T/2 * 2 = 100 → T = 66
    assert fit_steps(0, 100.0, 1.0, 0.0, lambda p: 1.0 if p < 0.5 else 2.0) in (66, 67)
    assert fit_steps(0, 100.0, 1.0, 0.25, lambda p: 1.0) == 80  # with per-step overhead
    assert fit_steps(10, 0.0, 1.0, 0.0, lambda p: 1.0) == 10


def test_eval_every_skips_evaluations_but_not_checkpoints(tmp_path):
    """--eval-every 2 over 3 epochs: held-out numbers at epochs 2 and 3 (the end), a checkpoint after each epoch."""
    vitkit.io.register_model_type("tiny_ae", AEConfig, TinyAE)
    batches = [torch.randn(4, 1, 28, 28) for _ in range(2)]
    evals, saved = [], []

    def eval_fn(m):
        evals.append(1)
        return {"val_loss": float(len(evals))}

    def on_epoch_end(trainer, row):
        saved.append(torch.load(tmp_path / "ev" / "last.state.pt", weights_only=True)["epoch"])

    cfg = _tc(tmp_path, "ev", epochs=3, batch_size=4, eval_every=2, best_metric="val_loss", best_mode="min")
    s = Trainer(TinyAE(), lambda e, r, w: batches, cfg, lambda m, x: (nn.functional.mse_loss(m(x), x), {}),
                eval_fn, on_epoch_end=on_epoch_end).fit()
    rows = read_metrics(tmp_path / "ev" / "metrics.csv")
    assert [r["val_loss"] for r in rows] == ["", 1, 2] and saved == [1, 2, 3]
    assert (s["best"], s["best_epoch"]) == (1.0, 2)  # chosen among evaluated epochs only
