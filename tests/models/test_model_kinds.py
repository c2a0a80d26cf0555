"""Each model kind gets what it is: token merging really merges in every ViT variant (a distilled DeiT included, not
only the plain class), and an MAE — not a classifier — is refused by what needs one (optimize, apply_tome) in one
clear line, while its checkpoints from before keep loading to the same numbers."""
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import vitkit
from vitkit.models import count_flops, create_model
from vitkit.models.deit import VisionTransformerDistilled
from vitkit.models.mae import MAEConfig, MaskedAutoencoderViT
from vitkit.models.tome import apply_tome, remove_tome, tome_flops

FIXTURES = Path(__file__).parent / "fixtures"
DEIT = dict(img_size=32, patch_size=4, in_chans=3, embed_dim=16, depth=3, num_heads=2, num_classes=5, reg_tokens=1)


def _tokens_per_block(model, x):
    """How many tokens enter each block in one forward (seen by its first norm: a merging block runs through
    `Block.forward_merging`, not the block's own hooks)."""
    seen = []
    hooks = [b.norm1.register_forward_pre_hook(lambda mod, args: seen.append(args[0].shape[1])) for b in model.blocks]
    try:
        with torch.no_grad():
            model(x)
    finally:
        for h in hooks:
            h.remove()
    return seen


def test_tome_merges_tokens_in_a_distilled_deit():
    deit = VisionTransformerDistilled(**DEIT).eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        plain = deit(x)
        assert torch.equal(apply_tome(deit, 0)(x), plain)  # r=0: the plain outputs, bit for bit
        assert _tokens_per_block(deit, x) == [66, 66, 66]
        apply_tome(deit, 8)
        assert _tokens_per_block(deit, x) == [66, 58, 50]  # 8 fewer after each block; both prefix tokens stay
        merged = deit(x)
        assert deit.forward_features(x).shape == (2, 42, 16)
    assert not torch.equal(merged, plain) and (merged - plain).abs().max() < 0.5 * plain.abs().max()
    assert tome_flops(deit) < 0.85 * count_flops(deit.config)["flops"]
    # the same merged tokens as a plain ViT with the same weights, and DeiT's two heads read them
    vit = create_model(**{k: v for k, v in DEIT.items()}).eval()
    vit.load_state_dict({k: v for k, v in deit.state_dict().items() if not k.startswith("head_dist")})
    apply_tome(vit, 8)
    with torch.no_grad():
        tokens = vit.forward_features(x)
        torch.testing.assert_close(deit.forward_features(x), tokens, rtol=0, atol=0)
        torch.testing.assert_close(merged, (deit.head(tokens[:, 0]) + deit.head_dist(tokens[:, 1])) / 2)
        assert torch.equal(remove_tome(deit)(x), plain)


def test_fast_path_pools_merged_tokens_by_size_in_every_backend():
    """embed_images (what retrieval indexes) of an average-pool model with merging: each merged token weighs the
    patches it stands for, in the eager and compiled backends as in the oneDNN one (eager pooled them unweighted)."""
    m = create_model("vit_mini_patch4_28", depth=2, global_pool="avg").eval()
    x = torch.randn(2, 1, 28, 28)
    merged = apply_tome(create_model("vit_mini_patch4_28", depth=2, global_pool="avg").eval(), 5)
    merged.load_state_dict(m.state_dict())
    with torch.no_grad():
        tokens, size = merged.forward_features_sizes(x)
        expected = merged.fc_norm((tokens[:, 1:] * size[:, 1:]).sum(1) / size[:, 1:].sum(1))
        for backend in ("eager", "auto"):
            got = vitkit.optimize(m, tome_r=5, backend=backend, tune_allocator=False).embed_images(x)
            torch.testing.assert_close(got, expected, rtol=0, atol=1e-4)


def _mae():
    return MaskedAutoencoderViT(MAEConfig(img_size=8, patch_size=2, in_chans=1, embed_dim=8, depth=1, num_heads=2,
                                          decoder_embed_dim=8, decoder_depth=1, decoder_num_heads=2))


def test_an_mae_is_not_a_classifier_and_is_refused_clearly():
    mae = _mae()
    assert not isinstance(mae, vitkit.VisionTransformer)
    with pytest.raises(TypeError, match="^optimize needs a vitkit VisionTransformer, got MaskedAutoencoderViT; "
                                        "call .to_encoder"):
        vitkit.optimize(mae)
    with pytest.raises(TypeError, match="^apply_tome needs a vitkit VisionTransformer, got MaskedAutoencoderViT; "
                                        "call .to_encoder"):
        apply_tome(mae, 2)
    # what it hands over is one
    enc = mae.to_encoder(num_classes=3)
    assert type(enc) is vitkit.VisionTransformer and vitkit.optimize(enc, backend="eager")


def test_an_mae_checkpoint_from_before_loads_to_the_same_numbers():
    """mae_tiny_v1.safetensors was saved when MaskedAutoencoderViT subclassed VisionTransformer
    (fixtures/make_mae_tiny_v1.py): its keys, config and outputs hold."""
    m = vitkit.load(FIXTURES / "mae_tiny_v1.safetensors")
    assert type(m) is MaskedAutoencoderViT
    ref = load_file(str(FIXTURES / "mae_tiny_v1_outputs.safetensors"))
    with torch.no_grad():
        loss, pred, mask = m(ref["x"], noise=ref["noise"])
        features = m.to_encoder(num_classes=0)(ref["x"])
    # bit for bit in a fresh process; a suite that changed torch's thread count may reduce in another order
    assert torch.equal(mask, ref["mask"])
    for got, want in ((loss, ref["loss"]), (pred, ref["pred"]), (features, ref["features"])):
        torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)
    assert set(m.state_dict()) == set(_mae().state_dict()) == set(load_file(str(FIXTURES / "mae_tiny_v1.safetensors")))


def test_every_registered_model_type_saves_and_loads_as_itself(tmp_path):
    """One table in models/ names every kind a checkpoint holds; each saves under its name and loads to its class."""
    from vitkit.models.dit import DiT, DiTConfig
    from vitkit.models.registry import MODEL_TYPES, model_type_of

    assert sorted(MODEL_TYPES) == ["dit", "mae", "vit", "vit_distilled"]
    models = {"vit": create_model(**{**DEIT, "reg_tokens": 0}), "vit_distilled": VisionTransformerDistilled(**DEIT),
              "mae": _mae(), "dit": DiT(DiTConfig(img_size=8, patch_size=2, embed_dim=8, depth=1, num_heads=2))}
    for name, m in models.items():
        assert model_type_of(m) == name
        back = vitkit.load(vitkit.save(m, tmp_path / f"{name}.safetensors"))
        assert type(back) is type(m) and back.config == m.config
        assert all(torch.equal(v, back.state_dict()[k]) for k, v in m.state_dict().items())
    assert model_type_of(torch.nn.Linear(2, 2)) is None
