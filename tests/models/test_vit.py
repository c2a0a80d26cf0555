"""The ViT itself: exact parity with timm and Hugging Face, the model interface, training behaviour, bad input.

Every reference is re-randomised at a trained-like scale (`_reference.randomize_`) and checked not to be degenerate
(`check_reference`): with default weights a swapped norm, bias or q/k/v order does not change the outputs."""
import math

import pytest
import torch
import torch.nn as nn
from _reference import assert_hidden_states_match, check_reference, randomize_

from vitkit.models import VisionTransformer, ViTConfig, count_flops, count_params, create_model, get_config, list_models

timm = pytest.importorskip("timm")

PARITY = [
    ("vit_tiny_patch16_224", {}),
    ("vit_small_patch16_224", {}),
    ("vit_base_patch16_224", {}),
    ("vit_small_patch32_224", {}),
    ("vit_tiny_patch16_224", {"global_pool": "avg"}),
    ("vit_tiny_patch16_224", {"reg_tokens": 4}),
    ("vit_tiny_patch16_224", {"reg_tokens": 4, "no_embed_class": True}),
    ("vit_tiny_patch16_224", {"init_values": 1e-5}),
    ("vit_tiny_patch16_224", {"qk_norm": True, "qkv_bias": False}),
]


def _pair(name, **kw):
    ref = randomize_(timm.create_model(name, pretrained=False, **kw).eval())
    ours = create_model(name, **kw).eval()
    ours.load_state_dict(ref.state_dict(), strict=True)
    return ref, ours


def _max_diff(a, b):
    return (a - b).abs().max().item()


@pytest.mark.parametrize("name,kw", PARITY, ids=[f"{n}-{k}" for n, k in PARITY])
def test_timm_parity_native_and_dynamic_size(name, kw):
    ref, ours = _pair(name, **kw)
    batch = 2
    x = torch.randn(2, 3, 224, 224)
    check_reference(ours, x)
    with torch.no_grad():
        assert _max_diff(ref(x), ours(x)) <= 1e-5
        assert _max_diff(ref.forward_features(x), ours.forward_features(x)) <= 1e-5
        # another runtime size, non-square: timm's dynamic_img_size=True resamples pos-embed on the fly
        dyn = timm.create_model(name, pretrained=False, dynamic_img_size=True, **kw).eval()
        dyn.load_state_dict(ref.state_dict())
        h, w = (256, 320) if "patch32" in name else (240, 320)
        x2 = torch.randn(batch, 3, h, w)
        assert _max_diff(dyn(x2), ours(x2)) <= 1e-5


def test_state_dict_keys_and_shapes_equal_timm():
    for name, kw in PARITY:
        if "base" in name:
            continue
        ref = timm.create_model(name, pretrained=False, **kw)
        ours = create_model(name, **kw)
        a = {k: tuple(v.shape) for k, v in ref.state_dict().items()}
        b = {k: tuple(v.shape) for k, v in ours.state_dict().items()}
        assert a == b, name


@pytest.mark.parametrize("fmt", ["NCHW", "NLC"])
def test_forward_intermediates_match_timm(fmt):
    ref = timm.create_model("vit_tiny_patch16_224", pretrained=False, dynamic_img_size=True, reg_tokens=2).eval()
    ours = create_model("vit_tiny_patch16_224", reg_tokens=2).eval()
    ours.load_state_dict(randomize_(ref).state_dict())
    x = torch.randn(2, 3, 224, 288)
    check_reference(ours, x)
    with torch.no_grad():
        for kwargs in [dict(indices=3), dict(indices=[0, 5, -1], norm=True), dict(indices=2, return_prefix_tokens=True)]:
            fa, ia = ref.forward_intermediates(x, output_fmt=fmt, **kwargs)
            fb, ib = ours.forward_intermediates(x, output_fmt=fmt, **kwargs)
            assert _max_diff(fa, fb) <= 1e-5
            assert len(ia) == len(ib)
            for a, b in zip(ia, ib):
                if isinstance(a, tuple):
                    assert _max_diff(a[0], b[0]) <= 1e-5 and _max_diff(a[1], b[1]) <= 1e-5
                else:
                    assert a.shape == b.shape and _max_diff(a, b) <= 1e-5
        maps = ours.forward_intermediates(x, indices=1, intermediates_only=True)
        assert maps[0].shape == (2, 192, 14, 18)


def _hf_to_vitkit(sd, depth, prefix):
    """timm ← HF ViT key mapping (q/k/v merged into qkv), as in REFERENCE.md B2. transformers 5 renamed the
    in-memory layout (`layers.N.attention.q_proj`, `mlp.fc1`); both spellings are handled."""
    p = prefix
    out = {
        "cls_token": sd[f"{p}embeddings.cls_token"],
        "pos_embed": sd[f"{p}embeddings.position_embeddings"],
        "patch_embed.proj.weight": sd[f"{p}embeddings.patch_embeddings.projection.weight"],
        "patch_embed.proj.bias": sd[f"{p}embeddings.patch_embeddings.projection.bias"],
        "norm.weight": sd[f"{p}layernorm.weight"],
        "norm.bias": sd[f"{p}layernorm.bias"],
    }
    v5 = any(k.startswith(f"{p}layers.") for k in sd)
    for i in range(depth):
        B = f"blocks.{i}."
        if v5:
            L = f"{p}layers.{i}."
            qkv = [L + f"attention.{n}_proj" for n in "qkv"]
            pairs = [("norm1", "layernorm_before"), ("attn.proj", "attention.o_proj"), ("norm2", "layernorm_after"),
                     ("mlp.fc1", "mlp.fc1"), ("mlp.fc2", "mlp.fc2")]
        else:
            L = f"{p}encoder.layer.{i}."
            qkv = [L + f"attention.attention.{n}" for n in ("query", "key", "value")]
            pairs = [("norm1", "layernorm_before"), ("attn.proj", "attention.output.dense"),
                     ("norm2", "layernorm_after"), ("mlp.fc1", "intermediate.dense"), ("mlp.fc2", "output.dense")]
        out[B + "attn.qkv.weight"] = torch.cat([sd[n + ".weight"] for n in qkv])
        out[B + "attn.qkv.bias"] = torch.cat([sd[n + ".bias"] for n in qkv])
        for ours, theirs in pairs:
            out[B + ours + ".weight"] = sd[L + theirs + ".weight"]
            out[B + ours + ".bias"] = sd[L + theirs + ".bias"]
    if "classifier.weight" in sd:
        out["head.weight"], out["head.bias"] = sd["classifier.weight"], sd["classifier.bias"]
    return out


def test_huggingface_parity_layer_by_layer():
    transformers = pytest.importorskip("transformers")
    cfg = transformers.ViTConfig(hidden_size=192, num_hidden_layers=4, num_attention_heads=3, intermediate_size=768,
                                 image_size=64, patch_size=16, num_labels=7, layer_norm_eps=1e-6,
                                 hidden_act="gelu", qkv_bias=True)
    ours = create_model(embed_dim=192, depth=4, num_heads=3, img_size=64, patch_size=16, num_classes=7).eval()
    x = torch.randn(3, 3, 64, 64)

    clf = randomize_(transformers.ViTForImageClassification(cfg).eval(), seed=1)
    ours.load_state_dict(_hf_to_vitkit(clf.state_dict(), 4, "vit."), strict=True)
    check_reference(ours, x)
    with torch.no_grad():
        out = clf(pixel_values=x, output_hidden_states=True)
        assert _max_diff(out.logits, ours(x)) <= 1e-5
    assert_hidden_states_match(out.hidden_states, ours, x)

    bare = randomize_(transformers.ViTModel(cfg, add_pooling_layer=False).eval(), seed=2)
    ours.reset_classifier(0)
    ours.load_state_dict(_hf_to_vitkit(bare.state_dict(), 4, ""), strict=True)
    check_reference(ours, x)
    with torch.no_grad():
        out = bare(pixel_values=x, output_hidden_states=True)
        assert _max_diff(out.last_hidden_state, ours.forward_features(x)) <= 1e-5
    assert_hidden_states_match(out.hidden_states, ours, x)


def test_reference_guard_rejects_degenerate_references():
    """check_reference must fail the default-initialised references the parity tests used to compare."""
    x = torch.randn(2, 3, 32, 32)
    kw = dict(img_size=32, patch_size=8, embed_dim=64, depth=2, num_heads=4, num_classes=5)
    with pytest.raises(AssertionError, match="degenerate reference: LayerNorm"):
        check_reference(create_model(**kw).eval(), x)
    model = randomize_(create_model(**kw).eval())
    check_reference(model, x)
    with torch.no_grad():
        model.blocks[1].attn.qkv.bias.zero_()
    with pytest.raises(AssertionError, match=r"blocks\.1\.attn\.qkv\.bias is \(close to\) zero"):
        check_reference(model, x)
    model = randomize_(create_model(**kw).eval())
    with torch.no_grad():  # q and k ~0: every query attends uniformly
        model.blocks[0].attn.qkv.weight[:128].mul_(1e-4)
        model.blocks[0].attn.qkv.bias[:128].mul_(1e-4)
    with pytest.raises(AssertionError, match="attention entropy"):
        check_reference(model, x)
    model = randomize_(create_model(**kw).eval())
    with torch.no_grad():
        model.head.weight.zero_()
    with pytest.raises(AssertionError, match="do not vary"):
        check_reference(model, x)
    with pytest.raises(TypeError, match="does not know how to draw"):
        randomize_(nn.Sequential(nn.BatchNorm1d(3)))


def test_attention_path_matches_fused_path_and_is_a_distribution():
    model = randomize_(create_model("vit_tiny_patch16_224", img_size=64, reg_tokens=1).eval())
    x = torch.randn(2, 3, 64, 96)
    with torch.no_grad():
        logits, attns = model(x, return_attention=True)
        # explicit softmax vs fused SDPA: the same math rounded differently, in 12 blocks whose residual stream
        # reaches O(10)-O(50) with trained-like weights, so 1e-5 relative to that stream, not to the O(1) logits
        stream = model.forward_intermediates(x, indices=1, output_fmt="NLC", intermediates_only=True)[0]
        assert _max_diff(logits, model(x)) <= 1e-5 * stream.abs().max().item()
    assert len(attns) == 12
    n = 2 + (64 // 16) * (96 // 16)
    assert all(a.shape == (2, 3, n, n) for a in attns)
    torch.testing.assert_close(attns[0].sum(-1), torch.ones(2, 3, n))
    assert (attns[0] >= 0).all()


def test_gradients_reach_every_parameter():
    model = create_model("vit_mini_patch7_28", reg_tokens=2, init_values=1e-4)
    model(torch.randn(4, 1, 28, 28)).sum().backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name


def test_dropout_and_drop_path_only_in_training():
    model = create_model("vit_mini_patch7_28", drop_rate=0.3, pos_drop_rate=0.3, proj_drop_rate=0.3,
                         attn_drop_rate=0.3, drop_path_rate=0.5)
    plain = create_model("vit_mini_patch7_28")
    plain.load_state_dict(model.state_dict())
    x = torch.randn(4, 1, 28, 28)
    model.train()
    assert _max_diff(model(x), model(x)) > 1e-3  # stochastic while training
    model.eval(), plain.eval()
    with torch.no_grad():
        assert _max_diff(model(x), plain.eval()(x)) == 0.0
    drop_paths = [m for m in model.modules() if type(m).__name__ == "DropPath"]
    assert len(drop_paths) == 10 and math.isclose(drop_paths[-1].drop_prob, 0.5, rel_tol=1e-6)


def test_grad_checkpointing_gives_the_same_gradients():
    a = create_model("vit_mini_patch7_28")
    b = create_model("vit_mini_patch7_28")
    b.load_state_dict(a.state_dict())
    b.set_grad_checkpointing(True)
    x = torch.randn(3, 1, 28, 28)
    a(x).pow(2).sum().backward()
    b(x).pow(2).sum().backward()
    for (n, pa), pb in zip(a.named_parameters(), b.parameters()):
        torch.testing.assert_close(pa.grad, pb.grad, rtol=1e-5, atol=1e-6, msg=n)


def test_seed_training_loop_runs_unchanged_and_loss_goes_down():
    """The seed article's loop: Adam lr 1e-3, CrossEntropyLoss, on a fixed batch."""
    model = create_model("vit_mini_patch7_28")
    images, labels = torch.randn(16, 1, 28, 28), torch.randint(0, 10, (16,))
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    criterion = nn.CrossEntropyLoss()
    losses = []
    for _ in range(10):
        optimizer.zero_grad()
        outputs = model(images)
        loss = criterion(outputs, labels)
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0]


@pytest.mark.parametrize("shape,match", [
    ((2, 3, 28, 28), "input channel"),
    ((1, 28, 28), "rank 3"),
    ((2, 1, 30, 28), "not a multiple of the patch size"),
])
def test_bad_input_is_a_clear_value_error(shape, match):
    model = create_model("vit_mini_patch7_28")
    with pytest.raises(ValueError, match=match):
        model(torch.randn(*shape))


def test_dynamic_img_pad_matches_timm():
    ref = timm.create_model("vit_tiny_patch16_224", pretrained=False, dynamic_img_size=True,
                            dynamic_img_pad=True).eval()
    ours = create_model("vit_tiny_patch16_224", dynamic_img_pad=True).eval()
    ours.load_state_dict(randomize_(ref).state_dict())
    x = torch.randn(2, 3, 100, 130)
    check_reference(ours, x)
    with torch.no_grad():
        assert _max_diff(ref(x), ours(x)) <= 1e-5


def test_set_input_size_matches_timm():
    ref = randomize_(timm.create_model("vit_tiny_patch16_224", pretrained=False).eval())
    weights = {k: v.clone() for k, v in ref.state_dict().items()}
    for kwargs in [dict(img_size=(160, 256)), dict(patch_size=8), dict(img_size=288, patch_size=12)]:
        ref = timm.create_model("vit_tiny_patch16_224", pretrained=False).eval()
        ref.load_state_dict(weights)
        ours = create_model("vit_tiny_patch16_224").eval()
        ours.load_state_dict(weights)
        ref.set_input_size(**kwargs)
        ours.set_input_size(**kwargs)
        h, w = ours.patch_embed.img_size
        x = torch.randn(2, 3, h, w)
        check_reference(ours, x)
        with torch.no_grad():
            assert _max_diff(ref(x), ours(x)) <= 1e-5, kwargs
        assert ours.pos_embed.shape == ref.pos_embed.shape
        assert ours.config.patch_size == ours.patch_embed.patch_size[0]


def test_default_init():
    model = create_model("vit_small_patch16_224")
    assert abs(model.pos_embed.std().item() - 0.02) < 0.002
    assert model.cls_token.abs().max().item() < 1e-4
    fc1 = model.blocks[0].mlp.fc1
    bound = math.sqrt(6 / (fc1.in_features + fc1.out_features))
    assert fc1.weight.abs().max().item() <= bound and fc1.weight.abs().max().item() > 0.9 * bound
    assert all(m.bias.abs().sum() == 0 for m in model.modules() if isinstance(m, nn.Linear))
    timm_init = create_model("vit_small_patch16_224", weight_init="timm")
    assert abs(timm_init.blocks[0].attn.qkv.weight.std().item() - 0.02) < 0.002


def test_registry_and_config():
    names = list_models()
    for size in ("tiny", "small", "base", "large", "huge"):
        for patch in (8, 14, 16, 32):
            assert f"vit_{size}_patch{patch}_224" in names
    assert "vit_base_patch16_384" in names and "vit_tiny_patch4_32" in names
    assert list_models("vit_*_patch16_384") == sorted(n for n in names if n.endswith("patch16_384"))
    # published sizes (timm results/benchmark csv): Ti 5.72M, S 22.05M, B 86.57M params
    for name, params, gmacs in [("vit_tiny_patch16_224", 5.72, 1.26), ("vit_small_patch16_224", 22.05, 4.61),
                                ("vit_base_patch16_224", 86.57, 17.58)]:
        cfg = get_config(name)
        assert round(count_params(cfg) / 1e6, 2) == params
        assert abs(count_flops(cfg)["macs"] / 1e9 - gmacs) / gmacs < 0.01
    small = create_model("vit_mini_patch7_28", reg_tokens=3, init_values=0.1, qk_norm=True, global_pool="avg")
    assert count_params(small.config) == sum(p.numel() for p in small.parameters())
    with pytest.raises(ValueError, match="did you mean"):
        get_config("vit_tiny_patch16_244")
    with pytest.raises(ValueError, match="unknown model option"):
        create_model("vit_mini_patch7_28", embed_dims=3)
    with pytest.raises(ValueError, match="divisible"):
        create_model("vit_mini_patch7_28", num_heads=5)
    assert ViTConfig.from_dict(small.config.to_dict()) == small.config


def test_head_interface():
    model = create_model("vit_mini_patch7_28")
    assert {"pos_embed", "cls_token"} <= model.no_weight_decay()
    x = torch.randn(2, 1, 28, 28)
    feats = model.forward_features(x)
    assert feats.shape == (2, 17, 128)
    assert model.forward_head(feats, pre_logits=True).shape == (2, 128)
    model.reset_classifier(3)
    assert model(x).shape == (2, 3) and model.config.num_classes == 3
    model.reset_classifier(0)
    assert model(x).shape == (2, 128)
    with pytest.raises(ValueError, match="class_token"):
        VisionTransformer(get_config("vit_mini_patch7_28", class_token=False))
