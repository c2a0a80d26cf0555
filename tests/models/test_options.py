"""The data-efficiency options of the ViT: a convolutional stem (timm's HybridEmbed(ConvStem) layout and numerics)
and PatchDropout (timm's `patch_drop_rate`), each against its definition."""
from functools import partial

import pytest
import torch

import vitkit
from vitkit.models import count_flops, count_params, create_model

timm = pytest.importorskip("timm")


def _randomize_bn(model, seed=0):
    """BatchNorm with non-trivial statistics and affine parameters, so a swapped or skipped BN shows."""
    g = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.copy_(torch.randn(m.num_features, generator=g) * 0.3)
            m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)
            m.weight.data.copy_(1 + 0.3 * torch.randn(m.num_features, generator=g))
            m.bias.data.copy_(0.3 * torch.randn(m.num_features, generator=g))


@pytest.mark.parametrize("patch,channels", [(4, ()), (8, (16, 32, 48)), (2, ())])
def test_conv_stem_is_timms_hybrid_conv_stem(patch, channels):
    from timm.layers.hybrid_embed import HybridEmbed
    from timm.models.vision_transformer_hybrid import ConvStem

    ours = create_model(img_size=32, patch_size=patch, embed_dim=48, depth=2, num_heads=3, num_classes=5,
                        stem="conv", stem_channels=channels, global_pool="avg").eval()
    widths = tuple(m.conv.out_channels for m in ours.patch_embed.backbone)
    assert len(widths) == {2: 1, 4: 2, 8: 3}[patch] and (not channels or widths == channels)
    backbone = ConvStem(in_chans=3, depth=len(widths), channels=widths, stride=(2,) * len(widths))
    ref = timm.models.VisionTransformer(img_size=32, patch_size=1, embed_dim=48, depth=2, num_heads=3,
                                        num_classes=5, global_pool="avg",
                                        embed_layer=partial(HybridEmbed, backbone=backbone)).eval()
    with torch.no_grad():
        for p in ref.parameters():
            p.normal_(0, 0.2)
    _randomize_bn(ref)
    assert {k: v.shape for k, v in ref.state_dict().items()} == {k: v.shape for k, v in ours.state_dict().items()}
    ours.load_state_dict(ref.state_dict(), strict=True)
    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        a, b = ref(x), ours(x)
    assert a.std() > 0.05 and (a - b).abs().max().item() <= 1e-5
    assert ours.patch_embed.dynamic_feat_size((32, 32)) == (32 // patch, 32 // patch)
    # the analytic counts include the stem
    assert count_params(ours.config) == sum(p.numel() for p in ours.parameters())
    stem_macs = sum(m.conv.weight.numel() * (32 // m.conv.stride[0] ** (i + 1)) ** 2
                    for i, m in enumerate(ours.patch_embed.backbone))
    plain = count_flops(ours.config.replace(stem="patch", stem_channels=()))
    conv = count_flops(ours.config)
    patch_macs = (32 // patch) ** 2 * 3 * patch**2 * 48
    proj_macs = (32 // patch) ** 2 * widths[-1] * 48
    assert conv["macs"] - plain["macs"] == stem_macs + proj_macs - patch_macs


def test_conv_stem_trains_saves_and_refuses_what_it_cannot_do(tmp_path):
    model = create_model("vit_mini_patch4_28", stem="conv", depth=2)
    x = torch.randn(4, 1, 28, 28)
    model(x).sum().backward()
    assert all(p.grad is not None for p in model.parameters())
    again = vitkit.load(vitkit.save(model.eval(), tmp_path / "m.safetensors"))
    with torch.no_grad():
        assert torch.equal(again(x), model(x))
    with pytest.raises(ValueError, match="power of two"):
        create_model("vit_mini_patch7_28", stem="conv")
    with pytest.raises(ValueError, match="one width per stride-2 conv"):
        create_model("vit_mini_patch4_28", stem="conv", stem_channels=(16,))
    deeper = create_model("vit_mini_patch4_28", stem="conv", stem_channels=(8, 16, 32), depth=1)  # + a stride-1 conv
    assert [m.conv.stride[0] for m in deeper.patch_embed.backbone] == [1, 2, 2]
    assert deeper(torch.randn(2, 1, 28, 28)).shape == (2, 10)
    assert count_params(deeper.config) == sum(p.numel() for p in deeper.parameters())
    x = torch.randn(1, 1, 28, 28)
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as fc:
        with torch.no_grad():
            deeper.patch_embed(x)
    stem_macs = count_flops(deeper.config)["macs"] - count_flops(deeper.config.replace(stem="patch",
                                                                                         stem_channels=()))["macs"]
    assert fc.get_total_flops() // 2 == stem_macs + 49 * 1 * 16 * 128  # counted minus the patchify it replaced
    with pytest.raises(ValueError, match="stem must be"):
        create_model("vit_mini_patch4_28", stem="resnet")
    with pytest.raises(ValueError, match="patch size cannot change"):
        model.set_input_size(patch_size=2)
    model.set_input_size(img_size=56)  # a new grid: pos-embed resampled, the stem is size-agnostic
    assert model(torch.randn(1, 1, 56, 56)).shape == (1, 10)


def test_patch_dropout_keeps_the_prefix_and_is_off_in_eval():
    model = create_model("vit_mini_patch4_28", depth=1, reg_tokens=2, patch_drop_rate=0.5)
    x = torch.randn(3, 1, 28, 28)
    model.train()
    full = model._pos_embed(model.patch_embed(x))  # (3, 3 + 49, D): class, 2 registers, 49 patches
    torch.manual_seed(1)
    kept = model.patch_drop(full)
    assert kept.shape == (3, 3 + 24, full.shape[-1])  # int(49 * 0.5) patch tokens kept
    assert torch.equal(kept[:, :3], full[:, :3])  # class and register tokens always stay
    # every kept token is one of the image's own patch tokens, each at most once, and images differ in which
    picks = []
    for b in range(3):
        same = (kept[b, 3:, None, :] == full[b, None, 3:, :]).all(-1)  # (24 kept, 49 patches): exact copies
        assert (same.sum(1) == 1).all() and same.any(0).sum() == 24
        picks.append(set(same.float().argmax(1).tolist()))
    assert picks[0] != picks[1] or picks[1] != picks[2]
    model.eval()
    assert model.patch_drop(full).shape == full.shape
    with torch.no_grad():
        plain = create_model("vit_mini_patch4_28", depth=1, reg_tokens=2)
        plain.load_state_dict(model.state_dict())
        assert torch.equal(model(x), plain.eval()(x))
    with pytest.raises(ValueError, match="patch_drop_rate"):
        create_model("vit_mini_patch4_28", patch_drop_rate=1.0)


def test_patch_dropout_matches_timms_placement():
    """timm drops patches after the position embedding and before norm_pre: the same tokens, given the same RNG."""
    kw = dict(img_size=32, patch_size=8, embed_dim=32, depth=1, num_heads=2, num_classes=3, patch_drop_rate=0.25)
    ref = timm.models.VisionTransformer(**kw).train()
    ours = create_model(**kw).train()
    ours.load_state_dict(ref.state_dict())
    x = torch.randn(2, 3, 32, 32)
    torch.manual_seed(3)
    a = ref.forward_features(x)
    torch.manual_seed(3)
    b = ours.forward_features(x)
    assert a.shape == b.shape == (2, 1 + 12, 32) and (a - b).abs().max().item() <= 1e-5


def test_a_conv_stem_checkpoint_in_timm_layout_loads_and_refuses_layouts_that_cannot_hold_it(tmp_path):
    from vitkit.errors import CheckpointError
    from vitkit.io import load_pretrained

    model = create_model(img_size=32, patch_size=4, embed_dim=48, depth=2, num_heads=3, num_classes=5, stem="conv",
                         stem_channels=(16, 32), global_pool="avg").eval()
    _randomize_bn(model)
    vitkit.export(model, tmp_path / "w.safetensors", "timm")  # timm's HybridEmbed(ConvStem) keys
    back = load_pretrained(tmp_path / "w.safetensors", num_heads=3)
    assert back.config.stem == "conv" and back.config.stem_channels == (16, 32) and back.config.patch_size == 4
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(back(x), model(x))
    for fmt, out in (("hf", tmp_path / "hf"), ("npz", tmp_path / "m.npz"), ("timm", tmp_path / "folder")):
        with pytest.raises(CheckpointError, match="convolutional stem"):
            vitkit.export(model, out, fmt)


def test_progressive_resolution_resamples_position_embeddings_as_set_input_size_does():
    """Training at a lower resolution runs the same model: its position embeddings resampled on the fly exactly as
    `set_input_size` resamples them for good (bicubic, antialiased), with or without a conv stem."""
    import copy

    for stem in ("patch", "conv"):
        model = create_model(img_size=32, patch_size=4, embed_dim=48, depth=2, num_heads=3, num_classes=5, stem=stem,
                             global_pool="avg").eval()
        with torch.no_grad():
            model.pos_embed.normal_(0, 0.5)
        low = copy.deepcopy(model)
        low.set_input_size(img_size=24)
        x = torch.randn(2, 3, 24, 24)
        with torch.no_grad():
            assert (model(x) - low(x)).abs().max().item() <= 1e-5
        assert low.pos_embed.shape[1] == 1 + 36 and model.pos_embed.shape[1] == 1 + 64  # stored at 32 px


@pytest.mark.parametrize("options,match", [
    ({"drop_path_rate": "banana"}, r"drop_path_rate must be a number in \[0, 1\), got 'banana'"),
    ({"embed_dim": -8}, "embed_dim must be >= 1, got -8"), ({"depth": 2.5}, "depth must be a whole number"),
    ({"num_heads": True}, "num_heads must be a whole number"), ({"mlp_ratio": 0}, "mlp_ratio must be > 0"),
    ({"img_size": [28, 28, 3]}, "img_size must be one size or a pair"), ({"img_size": 0}, "img_size must be >= 1"),
    ({"qk_norm": "yes"}, "qk_norm must be true or false"), ({"global_pool": "max"}, "global_pool must be 'token', 'avg' or ''"),
    ({"stem": "vgg"}, "stem must be 'patch' or 'conv'"), ({"attn_drop_rate": float("nan")}, "attn_drop_rate"),
    ({"stem_channels": [8, -1]}, "stem_channels must be >= 1"), ({"reg_tokens": -1}, "reg_tokens must be >= 0"),
    ({"dpeth": 3}, r"unknown model option\(s\) \['dpeth'\]")])
def test_model_options_are_checked_one_by_one(options, match):
    """Each model option alone (ViTConfig.check_fields): a ConfigError naming it, from the config, the model
    factory and the recipe alike, before anything is built."""
    from vitkit.tasks.recipe import MODEL_FIELDS, Recipe

    with pytest.raises(vitkit.ConfigError, match=match):
        vitkit.models.ViTConfig.check_fields(options)
    with pytest.raises(vitkit.ConfigError, match=match):
        create_model("vit_mini_patch7_28", **options)
    if set(options) <= set(MODEL_FIELDS):
        with pytest.raises(vitkit.ConfigError, match=match):
            Recipe(**options)


@pytest.mark.parametrize("argv,flag", [
    (["--model-arg", "drop_path_rate=banana"], "--model-arg drop_path_rate must be a number"),
    (["--model-arg", "embed_dim=-8"], "--model-arg embed_dim must be >= 1, got -8"),
    (["--embed-dim", "-8"], "--embed-dim must be >= 1, got -8"), (["--drop-path", "1.5"], "--drop-path must be"),
    (["--model-arg", "depth=1.5"], "--model-arg depth must be a whole number"),
    (["--model-arg", "nope=1"], "unknown model option(s) ['nope']"),
    (["--model-arg", "noequals"], "argument --model-arg: expected KEY=VALUE")])
def test_model_option_flags_are_one_line_errors_naming_the_flag(argv, flag, tmp_path, capsys):
    from vitkit.cli import main

    assert main(["train", "--runs-dir", str(tmp_path), "--epochs", "1", *argv]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("vitkit: error: ") and "\n" not in err and flag in err, err
    assert not any(tmp_path.iterdir())  # refused before any run folder


def test_a_model_larger_than_memory_is_refused_before_allocating(monkeypatch):
    """embed_dim=2**20 is petabytes of weights: a one-line ConfigError naming the size, not torch's allocator
    failing deep inside a layer (no tensor is made: torch.empty is watched)."""
    import torch

    from vitkit.errors import ConfigError

    made = []
    real = torch.empty
    monkeypatch.setattr(torch, "empty", lambda *a, **k: made.append(a) or real(*a, **k))
    with pytest.raises(ConfigError, match=r"embed_dim 1048576.*billion parameters.*choose a smaller model"):
        vitkit.create_model("vit_tiny_patch16_224", embed_dim=2**20, num_heads=4)
    assert all(not a or a == (0,) for a in made)  # only the probe of the default device
    assert vitkit.create_model("vit_tiny_patch16_224", embed_dim=8, num_heads=2) is not None
