"""Importing pretrained weights: each reference library writes a checkpoint with random weights, vitkit loads it,
and the logits agree to <= 1e-5 (fp32) — at the native size and after resampling, against the reference's own.

Every reference is re-randomised at a trained-like scale (`_reference.randomize_`: non-zero biases, spread
LayerNorms, peaked attention, a non-zero head) and the loaded model is checked not to be degenerate
(`check_reference`), so a swapped norm, bias or q/k/v order in a converter changes the logits by O(1)."""
import argparse
import json
import os

import numpy as np
import pytest
import torch
from _reference import assert_hidden_states_match, check_reference, randomize_

import vitkit
from vitkit.errors import CheckpointError
from vitkit.io import load_pretrained

timm = pytest.importorskip("timm")
TOL = 1e-5
MINI = dict(img_size=32, patch_size=4, depth=6, num_classes=10)  # the shape of vitkit's vit_mini_patch4_32


def _diff(a, b):
    return (a - b).abs().max().item()


def _logits(model, x):
    with torch.no_grad():
        return model(x)


@pytest.fixture(scope="module")
def tiny_timm(tmp_path_factory):
    """timm's ViT-Ti at 32 px, patch 4, depth 6 (= vitkit's vit_mini_patch4_32), saved as .pth and .safetensors."""
    from safetensors.torch import save_file

    d = tmp_path_factory.mktemp("timm")
    ref = randomize_(timm.create_model("vit_tiny_patch16_224", pretrained=False, **MINI).eval())
    torch.save(ref.state_dict(), d / "tiny.pth")
    save_file({k: v.contiguous() for k, v in ref.state_dict().items()}, str(d / "tiny.safetensors"))
    return ref, d


@pytest.mark.parametrize("name", ["tiny.pth", "tiny.safetensors"])
def test_timm_state_dict_native_size(tiny_timm, name):
    ref, d = tiny_timm
    net = vitkit.load_pretrained(d / name)  # num_heads=3 from the registered config of the same shape
    assert net.config.num_heads == 3 and net.config.depth == 6 and net.config.num_classes == 10
    x = torch.randn(2, 3, 32, 32)
    check_reference(net, x)
    assert _diff(_logits(ref, x), _logits(net, x)) <= TOL
    assert net.pretrained_cfg["input_size"] == [3, 32, 32] and net.pretrained_cfg["mean"] == [0.5] * 3


@pytest.mark.parametrize("kw", [dict(img_size=48), dict(img_size=64, patch_size=8)])
def test_timm_resampled_matches_timms_own_resampling(tiny_timm, kw):
    ref, d = tiny_timm
    theirs = timm.create_model("vit_tiny_patch16_224", pretrained=True, pretrained_cfg_overlay=dict(
        file=str(d / "tiny.pth"), num_classes=10), **{**MINI, **kw}).eval()
    ours = load_pretrained(d / "tiny.pth", **kw)
    size = kw["img_size"]
    assert ours.pretrained_cfg["input_size"] == [3, size, size]
    x = torch.randn(2, 3, size, size)
    check_reference(ours, x)
    assert _diff(_logits(theirs, x), _logits(ours, x)) <= TOL


@pytest.mark.parametrize("wrap", ["state_dict", "module.", "state_dict+module."])
def test_timm_training_checkpoint_wrappers(tiny_timm, tmp_path, wrap):
    """timm/Lightning save `{'state_dict': ...}`; DDP prefixes every key with `module.`."""
    ref, _ = tiny_timm
    sd = ref.state_dict()
    if "module." in wrap:
        sd = {f"module.{k}": v for k, v in sd.items()}
    obj = {"state_dict": sd, "epoch": 7, "optimizer": {"lr": 0.1}} if wrap.startswith("state_dict") else sd
    torch.save(obj, tmp_path / "ckpt.pth")
    net = load_pretrained(tmp_path / "ckpt.pth")
    x = torch.randn(2, 3, 32, 32)
    check_reference(net, x)
    assert _diff(_logits(ref, x), _logits(net, x)) <= TOL


def test_deit3_layerscale_gamma_names(tmp_path):
    """DeiT-III's own checkpoints name LayerScale `blocks.N.gamma_1/2` (timm renames them `ls1/ls2.gamma`) and add
    position embeddings to the patches only (no_embed_class)."""
    ref = randomize_(timm.create_model("deit3_small_patch16_224", pretrained=False, img_size=32, patch_size=8,
                                       depth=2, num_classes=4).eval())
    assert ref.no_embed_class
    sd = {k.replace(".ls1.gamma", ".gamma_1").replace(".ls2.gamma", ".gamma_2"): v for k, v in ref.state_dict().items()}
    assert "blocks.1.gamma_2" in sd
    torch.save({"model": sd}, tmp_path / "deit3.pth")
    net = load_pretrained(tmp_path / "deit3.pth", num_heads=6)
    assert net.config.no_embed_class and net.config.init_values
    x = torch.randn(2, 3, 32, 32)
    check_reference(net, x)
    assert _diff(_logits(ref, x), _logits(net, x)) <= TOL


def test_new_head_and_fine_tune_ready(tiny_timm):
    _, d = tiny_timm
    net = load_pretrained(d / "tiny.pth", num_classes=7, img_size=64)
    assert net(torch.randn(1, 3, 64, 64)).shape == (1, 7)
    assert net.pos_embed.shape == (1, 1 + 256, 192) and net.pretrained_cfg["class_names"] is None


def test_heads_from_argument_or_model_and_clear_errors(tmp_path):
    ref = randomize_(timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=64, depth=2).eval())
    torch.save(ref.state_dict(), tmp_path / "d2.pth")
    with pytest.raises(CheckpointError, match="pass num_heads"):
        load_pretrained(tmp_path / "d2.pth")
    net = load_pretrained(tmp_path / "d2.pth", num_heads=3)
    x = torch.randn(2, 3, 64, 64)
    check_reference(net, x)
    assert _diff(_logits(ref, x), _logits(net, x)) <= TOL
    with pytest.raises(CheckpointError, match=r"does not match model 'vit_small_patch16_224'.*embed_dim 192 vs 384"):
        load_pretrained(tmp_path / "d2.pth", model="vit_small_patch16_224")
    with pytest.raises(CheckpointError, match="not divisible"):
        load_pretrained(tmp_path / "d2.pth", num_heads=5)


def test_options_inferred_from_shapes(tmp_path):
    """Register tokens, no_embed_class, LayerScale, QK-norm (heads from its width), no qkv bias, avg pool + fc_norm."""
    kw = dict(img_size=32, patch_size=8, embed_dim=64, depth=2, num_heads=4, reg_tokens=2, no_embed_class=True,
              init_values=0.1, qk_norm=True, qkv_bias=False, global_pool="avg", num_classes=3, mlp_ratio=2.0)
    ref = randomize_(timm.models.VisionTransformer(**kw).eval())
    torch.save(ref.state_dict(), tmp_path / "odd.pth")
    net = load_pretrained(tmp_path / "odd.pth")
    c = net.config
    assert (c.reg_tokens, c.no_embed_class, c.qk_norm, c.qkv_bias, c.num_heads, c.mlp_ratio, c.global_pool) == \
        (2, True, True, False, 4, 2.0, "avg")
    x = torch.randn(2, 3, 32, 32)
    check_reference(net, x)
    assert _diff(_logits(ref, x), _logits(net, x)) <= TOL


def test_tiny_odd_checkpoint_one_channel_28px_patch7_dim8(tmp_path):
    ref = randomize_(timm.models.VisionTransformer(img_size=28, patch_size=7, in_chans=1, embed_dim=8, depth=1,
                                                  num_heads=2, num_classes=10).eval())
    torch.save({"model": ref.state_dict(), "epoch": 3}, tmp_path / "mnist.pth")
    with pytest.raises(CheckpointError, match="--num-heads"):
        load_pretrained(tmp_path / "mnist.pth")
    net = load_pretrained(tmp_path / "mnist.pth", num_heads=2)
    assert net.config.in_chans == 1 and net.config.img_size == 28 and net.pretrained_cfg["mean"] == [0.5]
    x = torch.randn(4, 1, 28, 28)
    check_reference(net, x)
    assert _diff(_logits(ref, x), _logits(net, x)) <= TOL


def test_deit_distilled(tmp_path):
    ref = timm.create_model("deit_tiny_distilled_patch16_224", pretrained=False, img_size=64, depth=2)
    ref = randomize_(ref.eval())
    torch.save({"model": ref.state_dict()}, tmp_path / "deit.pth")
    net = load_pretrained(tmp_path / "deit.pth", num_heads=3)
    assert type(net).__name__ == "VisionTransformerDistilled" and net.pretrained_cfg["crop_pct"] == 0.875
    x = torch.randn(2, 3, 64, 64)
    check_reference(net, x)
    assert _diff(_logits(ref, x), _logits(net, x)) <= TOL
    again = vitkit.load(vitkit.save(net, tmp_path / "deit.safetensors"))  # our format keeps the distilled head
    assert _diff(_logits(again, x), _logits(ref, x)) <= TOL
    fresh = load_pretrained(tmp_path / "deit.safetensors", num_classes=4)
    assert fresh(x).shape == (2, 4) and fresh.head_dist.out_features == 4


def test_mae_pretrain_and_finetuned(tmp_path):
    enc = randomize_(timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=64, depth=2,
                                       num_classes=0).eval())
    sd = dict(enc.state_dict())
    sd.update({"mask_token": torch.zeros(1, 1, 96), "decoder_embed.weight": torch.randn(96, 192),
               "decoder_pos_embed": torch.zeros(1, 17, 96), "decoder_blocks.0.norm1.weight": torch.ones(96),
               "decoder_norm.weight": torch.ones(96), "decoder_pred.weight": torch.randn(768, 96)})
    torch.save({"model": sd, "args": argparse.Namespace(mask_ratio=0.75)}, tmp_path / "mae_pretrain.pth")
    net = load_pretrained(tmp_path / "mae_pretrain.pth", num_heads=3)
    x = torch.randn(2, 3, 64, 64)
    check_reference(net, x)
    with torch.no_grad():
        assert net.num_classes == 0 and _diff(enc.forward_features(x), net.forward_features(x)) <= TOL
    assert net.pretrained_cfg["mean"] == [0.485, 0.456, 0.406]
    ft = randomize_(timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=64, depth=2, num_classes=5,
                                      global_pool="avg").eval())  # MAE fine-tuning: fc_norm after average pooling
    torch.save({"model": ft.state_dict()}, tmp_path / "mae_ft.pth")
    net = load_pretrained(tmp_path / "mae_ft.pth", num_heads=3)
    assert net.config.global_pool == "avg" and isinstance(net.fc_norm, torch.nn.LayerNorm)
    check_reference(net, x)
    assert _diff(_logits(ft, x), _logits(net, x)) <= TOL


# ---- Hugging Face --------------------------------------------------------------------------------------------
def _hf_config(**kw):
    transformers = pytest.importorskip("transformers")
    base = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128, image_size=32,
                patch_size=8, num_labels=3)  # layer_norm_eps left at transformers' default 1e-12
    base.update(kw)
    return transformers, transformers.ViTConfig(**base)


def test_hf_folder_classification_and_eps(tmp_path):
    transformers, cfg = _hf_config(id2label={0: "cat", 1: "dog", 2: "eel"}, label2id={"cat": 0, "dog": 1, "eel": 2})
    ref = randomize_(transformers.ViTForImageClassification(cfg).eval())
    ref.save_pretrained(tmp_path / "hf")
    (tmp_path / "hf" / "preprocessor_config.json").write_text(json.dumps(
        {"image_mean": [0.1, 0.2, 0.3], "image_std": [0.4, 0.5, 0.6], "resample": 3, "size": {"height": 32}}))
    net = load_pretrained(tmp_path / "hf")
    assert net.config.norm_eps == 1e-12 and net.config.num_heads == 4
    x = torch.randn(2, 3, 32, 32)
    check_reference(net, x)
    with torch.no_grad():
        out = ref(pixel_values=x, output_hidden_states=True)
        assert _diff(out.logits, net(x)) <= TOL
    assert_hidden_states_match(out.hidden_states, net, x)
    p = net.pretrained_cfg
    assert p["class_names"] == ["cat", "dog", "eel"] and p["mean"] == [0.1, 0.2, 0.3]
    assert p["interpolation"] == "bicubic"
    # the weights file alone, read through torch.load, forced format: the sibling config.json still counts
    st = load_pretrained(tmp_path / "hf" / "model.safetensors", fmt="hf")
    assert _diff(_logits(st, x), _logits(net, x)) == 0


def test_hf_sharded_folder(tmp_path):
    """A large HF model is saved in shards: `model.safetensors.index.json` + `model-0000x-of-0000y.safetensors`."""
    transformers, cfg = _hf_config(layer_norm_eps=1e-6)
    ref = randomize_(transformers.ViTForImageClassification(cfg).eval())
    ref.save_pretrained(tmp_path / "sharded", max_shard_size="50KB")
    shards = sorted(p.name for p in (tmp_path / "sharded").glob("model-*.safetensors"))
    assert len(shards) > 2 and (tmp_path / "sharded" / "model.safetensors.index.json").is_file()
    assert not (tmp_path / "sharded" / "model.safetensors").exists()
    net = load_pretrained(tmp_path / "sharded")
    x = torch.randn(2, 3, 32, 32)
    check_reference(net, x)
    with torch.no_grad():
        assert _diff(ref(pixel_values=x).logits, net(x)) <= TOL


def test_hf_bare_model_bin_and_transformers5_memory_layout(tmp_path):
    transformers, cfg = _hf_config(layer_norm_eps=1e-6)
    bare = randomize_(transformers.ViTModel(cfg).eval())  # with its pooler, which vitkit drops
    bare.save_pretrained(tmp_path / "bare")
    from safetensors.torch import load_file

    disk = load_file(str(tmp_path / "bare" / "model.safetensors"))
    os.remove(tmp_path / "bare" / "model.safetensors")
    torch.save(disk, tmp_path / "bare" / "pytorch_model.bin")
    net = load_pretrained(tmp_path / "bare")
    x = torch.randn(2, 3, 32, 32)
    check_reference(net, x)
    with torch.no_grad():
        assert net.num_classes == 0 and _diff(bare(pixel_values=x).last_hidden_state, net.forward_features(x)) <= TOL
    torch.save(bare.state_dict(), tmp_path / "v5.pth")  # transformers 5's in-memory names (layers.N.attention.q_proj)
    assert any(".q_proj." in k for k in bare.state_dict())
    v5 = load_pretrained(tmp_path / "v5.pth", num_heads=4)  # no config.json: eps falls back to HF's 1e-12
    assert v5.config.norm_eps == 1e-12 and net.config.norm_eps == 1e-6
    assert v5.state_dict().keys() == net.state_dict().keys()
    assert all(torch.equal(v, net.state_dict()[k]) for k, v in v5.state_dict().items())


def test_hf_deit_with_teacher_and_plain(tmp_path):
    transformers = pytest.importorskip("transformers")
    cfg = transformers.DeiTConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128,
                                  image_size=32, patch_size=8, num_labels=3)
    x = torch.randn(2, 3, 32, 32)
    for cls in (transformers.DeiTForImageClassificationWithTeacher, transformers.DeiTForImageClassification):
        ref = randomize_(cls(cfg).eval())
        ref.save_pretrained(tmp_path / cls.__name__)
        net = load_pretrained(tmp_path / cls.__name__)
        assert net.config.reg_tokens == 1 and net.config.norm_eps == 1e-12
        check_reference(net, x)
        with torch.no_grad():
            assert _diff(ref(pixel_values=x).logits, net(x)) <= TOL, cls.__name__


# ---- torchvision ---------------------------------------------------------------------------------------------
def test_torchvision(tmp_path):
    """torchvision's VisionTransformer class (the one vit_b_16 builds) at ViT-Ti width, 32 px, patch 4, depth 6."""
    from torchvision.models.vision_transformer import VisionTransformer as TV

    # torchvision zeroes its head at creation: randomize_ gives it (and every LayerNorm and bias) real values
    ref = randomize_(TV(image_size=32, patch_size=4, num_layers=6, num_heads=3, hidden_dim=192, mlp_dim=768,
                        num_classes=6).eval())
    torch.save(ref.state_dict(), tmp_path / "tv.pth")
    net = load_pretrained(tmp_path / "tv.pth")  # 3 heads from the registered vit_mini_patch4_32
    x = torch.randn(2, 3, 32, 32)
    check_reference(net, x)
    assert net.config.num_heads == 3 and _diff(_logits(ref, x), _logits(net, x)) <= TOL
    assert net.pretrained_cfg["mean"] == [0.485, 0.456, 0.406] and net.pretrained_cfg["source_format"] == "torchvision"
    sd = ref.state_dict()  # torchvision's legacy MLP names
    sd = {k.replace("mlp.0.", "mlp.linear_1.").replace("mlp.3.", "mlp.linear_2."): v for k, v in sd.items()}
    torch.save(sd, tmp_path / "tv_old.pth")
    assert _diff(_logits(load_pretrained(tmp_path / "tv_old.pth"), x), _logits(ref, x)) <= TOL


# ---- Google npz ----------------------------------------------------------------------------------------------
def _npz_pair(tmp_path, seed=0, **kw):
    args = dict(img_size=32, patch_size=8, embed_dim=64, depth=2, num_heads=4, num_classes=5)
    args.update(kw)
    ref = randomize_(timm.models.VisionTransformer(**args).eval(), seed=seed)
    return ref, vitkit.create_model(**args).eval()


@pytest.mark.parametrize("kw", [{}, dict(class_token=False, global_pool="avg", fc_norm=False),
                                dict(no_embed_class=True)], ids=["token", "gap", "big_vision"])
def test_npz_export_read_by_timm_and_back(tmp_path, kw):
    src, ours = _npz_pair(tmp_path, **kw)
    ours.load_state_dict(src.state_dict())
    vitkit.export(ours, tmp_path / "m.npz", "npz")
    theirs, _ = _npz_pair(tmp_path, seed=1, **kw)  # other random weights, overwritten by timm's npz reader
    timm.models.vision_transformer._load_weights(theirs, str(tmp_path / "m.npz"))
    x = torch.randn(2, 3, 32, 32)
    check_reference(ours, x)
    assert _diff(_logits(theirs, x), _logits(ours, x)) <= TOL
    back = load_pretrained(tmp_path / "m.npz")  # num_heads from the (D, H, Dh) kernels: no argument needed
    assert _diff(_logits(back, x), _logits(ours, x)) <= TOL and back.config.num_heads == 4


def _big_vision_npz(model, path, scanned=True, prefix="params/"):
    """The big_vision layout written independently of vitkit's exporter: linen numbering, pos-embed without the
    class slot at the root, blocks stacked on a leading depth axis."""
    sd = {k: v.detach().numpy() for k, v in model.state_dict().items()}
    D, H = model.embed_dim, model.blocks[0].attn.num_heads
    w = {"embedding/kernel": sd["patch_embed.proj.weight"].transpose(2, 3, 1, 0),
         "embedding/bias": sd["patch_embed.proj.bias"], "pos_embedding": sd["pos_embed"],
         "Transformer/encoder_norm/scale": sd["norm.weight"], "Transformer/encoder_norm/bias": sd["norm.bias"],
         "head/kernel": sd["head.weight"].T, "head/bias": sd["head.bias"]}
    if "cls_token" in sd:
        w["cls"] = sd["cls_token"]
    blocks = []
    for i in range(len(model.blocks)):
        b = lambda n: sd[f"blocks.{i}.{n}"]  # noqa: E731
        qkv_w, qkv_b = b("attn.qkv.weight"), b("attn.qkv.bias")
        blk = {"LayerNorm_0/scale": b("norm1.weight"), "LayerNorm_0/bias": b("norm1.bias"),
               "LayerNorm_1/scale": b("norm2.weight"), "LayerNorm_1/bias": b("norm2.bias"),
               "MultiHeadDotProductAttention_0/out/kernel": b("attn.proj.weight").T.reshape(H, D // H, D),
               "MultiHeadDotProductAttention_0/out/bias": b("attn.proj.bias")}
        for j, n in enumerate(("query", "key", "value")):
            blk[f"MultiHeadDotProductAttention_0/{n}/kernel"] = qkv_w[j * D:(j + 1) * D].T.reshape(D, H, D // H)
            blk[f"MultiHeadDotProductAttention_0/{n}/bias"] = qkv_b[j * D:(j + 1) * D].reshape(H, D // H)
        for r in range(2):
            blk[f"MlpBlock_0/Dense_{r}/kernel"] = b(f"mlp.fc{r + 1}.weight").T
            blk[f"MlpBlock_0/Dense_{r}/bias"] = b(f"mlp.fc{r + 1}.bias")
        blocks.append(blk)
    if scanned:
        for k in blocks[0]:
            w[f"Transformer/encoderblock/{k}"] = np.stack([blk[k] for blk in blocks])
    else:
        for i, blk in enumerate(blocks):
            w.update({f"Transformer/encoderblock_{i}/{k}": v for k, v in blk.items()})
    np.savez(path, **{prefix + k: v for k, v in w.items()})


@pytest.mark.parametrize("scanned,pool", [(True, "tok"), (False, "gap")])
def test_big_vision_npz(tmp_path, scanned, pool):
    kw = dict(no_embed_class=True) if pool == "tok" else dict(class_token=False, global_pool="avg", fc_norm=False)
    ref, _ = _npz_pair(tmp_path, **kw)
    _big_vision_npz(ref, tmp_path / "bv.npz", scanned=scanned)
    theirs, _ = _npz_pair(tmp_path, seed=1, **kw)
    timm.models.vision_transformer._load_weights(theirs, str(tmp_path / "bv.npz"))
    x = torch.randn(2, 3, 32, 32)
    assert _diff(_logits(theirs, x), _logits(ref, x)) <= TOL  # the hand-built file is what timm reads
    net = load_pretrained(tmp_path / "bv.npz")
    assert net.config.no_embed_class == (pool == "tok") and net.config.class_token == (pool == "tok")
    check_reference(net, x)
    assert _diff(_logits(net, x), _logits(ref, x)) <= TOL
    assert net.pretrained_cfg["interpolation"] == "bilinear" and net.pretrained_cfg["crop_pct"] == 1.0


def test_npz_image_tower_prefix(tmp_path):
    """Two-tower checkpoints (SigLIP/LiT-style) keep the image encoder under `params/img/`."""
    kw = dict(class_token=False, global_pool="avg", fc_norm=False)
    ref, _ = _npz_pair(tmp_path, **kw)
    _big_vision_npz(ref, tmp_path / "tower.npz", scanned=True, prefix="params/img/")
    net = load_pretrained(tmp_path / "tower.npz")
    x = torch.randn(2, 3, 32, 32)
    check_reference(net, x)
    assert _diff(_logits(net, x), _logits(ref, x)) <= TOL


def test_npz_vit_jax_train_prefix_and_pre_logits(tmp_path):
    src, ours = _npz_pair(tmp_path)
    ours.load_state_dict(src.state_dict())
    w = {"opt/target/" + k: v for k, v in np.load(vitkit.export(ours, tmp_path / "a.npz", "npz")["path"]).items()}
    w["opt/target/pre_logits/kernel"] = np.zeros((64, 64), np.float32)
    w["opt/target/pre_logits/bias"] = np.zeros(64, np.float32)
    np.savez(tmp_path / "b.npz", **w)
    net = load_pretrained(tmp_path / "b.npz")  # pre_logits and the head that reads it are dropped
    assert net.num_classes == 0
    x = torch.randn(2, 3, 32, 32)
    check_reference(net, x)
    with torch.no_grad():
        assert _diff(net.forward_features(x), ours.forward_features(x)) <= TOL


# ---- bad input -----------------------------------------------------------------------------------------------
class _Payload:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_malicious_pickle_is_refused_and_does_not_run(tmp_path):
    marker = tmp_path / "pwned"
    torch.save({"model": {"w": torch.zeros(1)}, "evil": _Payload(marker)}, tmp_path / "evil.pth")
    with pytest.raises(CheckpointError, match="refused.*arbitrary code"):
        load_pretrained(tmp_path / "evil.pth")
    assert not marker.exists()
    np.savez(tmp_path / "evil.npz", embedding=np.array([_Payload(marker)], dtype=object))
    with pytest.raises(CheckpointError, match="pickled objects, which vitkit refuses"):
        load_pretrained(tmp_path / "evil.npz")
    assert not marker.exists()
    torch.load(tmp_path / "evil.pth", weights_only=False)  # the control: unpickling it does run the payload
    assert marker.exists()


def test_truncated_wrong_and_missing(tiny_timm, tmp_path):
    ref, d = tiny_timm
    np.savez(d / "tiny.npz", **{"embedding/kernel": np.zeros((4, 4, 3, 8), np.float32)})
    for name in ("tiny.pth", "tiny.safetensors", "tiny.npz"):
        data = (d / name).read_bytes()
        (tmp_path / name).write_bytes(data[: len(data) // 3])
        with pytest.raises(CheckpointError, match="truncated"):
            load_pretrained(tmp_path / name)
    sd = dict(ref.state_dict())
    del sd["blocks.3.mlp.fc2.weight"]
    torch.save(sd, tmp_path / "missing.pth")
    with pytest.raises(CheckpointError, match=r"missing keys blocks\.3\.mlp\.fc2\.weight"):
        load_pretrained(tmp_path / "missing.pth")
    with pytest.raises(CheckpointError, match="not a complete hf ViT checkpoint.*timm layout"):
        load_pretrained(d / "tiny.pth", fmt="hf")
    torch.save({"foo.weight": torch.zeros(2)}, tmp_path / "other.pth")
    with pytest.raises(CheckpointError, match="cannot tell the checkpoint's layout"):
        load_pretrained(tmp_path / "other.pth")
    with pytest.raises(CheckpointError, match="does not exist"):
        load_pretrained(tmp_path / "nope.pth")


def test_hub_name_offline_is_a_clear_error(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf-home"))  # an empty cache
    with pytest.raises(CheckpointError, match="cannot download 'google/vit-base-patch16-224': offline"):
        load_pretrained("google/vit-base-patch16-224")
    with pytest.raises(CheckpointError, match="offline"):
        load_pretrained("timm/vit_base_patch16_224.augreg2_in21k_ft_in1k")


def test_hub_name_resolves_through_snapshot_download(monkeypatch, tmp_path):
    """Everything up to the network: a hub name asks huggingface_hub for config + safetensors and loads the folder."""
    huggingface_hub = pytest.importorskip("huggingface_hub")
    transformers, cfg = _hf_config()
    ref = randomize_(transformers.ViTForImageClassification(cfg).eval())
    ref.save_pretrained(tmp_path / "repo")
    calls = []

    def fake_snapshot_download(repo_id, revision=None, allow_patterns=None):
        calls.append((repo_id, tuple(allow_patterns)))
        return str(tmp_path / "repo")

    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake_snapshot_download)
    net = load_pretrained("google/vit-tiny-test", num_classes=2)
    assert calls == [("google/vit-tiny-test", ("*.json", "model.safetensors", "model.safetensors.index.json",
                                               "model-*.safetensors"))]
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        assert _diff(ref.vit(pixel_values=x).last_hidden_state, net.forward_features(x)) <= TOL
    assert net(x).shape == (1, 2)


def test_global_pool_override_keeps_the_head(tmp_path):
    """A timm `avg` model without fc_norm looks like a token model from its shapes: global_pool= says otherwise."""
    ref = randomize_(timm.models.VisionTransformer(img_size=32, patch_size=8, embed_dim=64, depth=1, num_heads=4,
                                                  num_classes=3, global_pool="avg", fc_norm=False).eval())
    torch.save(ref.state_dict(), tmp_path / "gap.pth")
    net = load_pretrained(tmp_path / "gap.pth", num_heads=4, global_pool="avg")
    x = torch.randn(2, 3, 32, 32)
    check_reference(net, x)
    assert net.config.global_pool == "avg" and _diff(_logits(ref, x), _logits(net, x)) <= TOL
