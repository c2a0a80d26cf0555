"""The checkpoint converters key by key and value by value: every from_*/to_* against a layout built by hand here
from REFERENCE.md §B (random tensors, so a swapped, transposed or mis-sliced tensor shows), the round trips,
detect_format and the refusals. Tiny: D=8, 2 heads of 4, MLP 12, 2 blocks, 3 channels, patch 2, 2x2 grid."""
import logging

import numpy as np
import pytest
import torch

from vitkit.errors import CheckpointError
from vitkit.io import convert
from vitkit.io.convert import (detect_format, from_hf, from_npz, from_timm, from_torchvision, to_hf, to_npz,
                               to_timm)

D, H, DH, F, DEPTH, C, P, N, K = 8, 2, 4, 12, 2, 3, 2, 4, 5


def _timm(cls=True, head=True, qkv_bias=True, pos_rows=None, depth=DEPTH, seed=0):
    """A timm-layout state dict with a distinct random tensor under every key."""
    g = torch.Generator().manual_seed(seed)

    def r(*shape):
        return torch.randn(*shape, generator=g)

    s = {"patch_embed.proj.weight": r(D, C, P, P), "patch_embed.proj.bias": r(D),
         "pos_embed": r(1, pos_rows if pos_rows is not None else N + int(cls), D)}
    if cls:
        s["cls_token"] = r(1, 1, D)
    for i in range(depth):
        b = f"blocks.{i}."
        s.update({b + "norm1.weight": r(D), b + "norm1.bias": r(D), b + "attn.qkv.weight": r(3 * D, D),
                  b + "attn.proj.weight": r(D, D), b + "attn.proj.bias": r(D), b + "norm2.weight": r(D),
                  b + "norm2.bias": r(D), b + "mlp.fc1.weight": r(F, D), b + "mlp.fc1.bias": r(F),
                  b + "mlp.fc2.weight": r(D, F), b + "mlp.fc2.bias": r(D)})
        if qkv_bias:
            s[b + "attn.qkv.bias"] = r(3 * D)
    s["norm.weight"], s["norm.bias"] = r(D), r(D)
    if head:
        s["head.weight"], s["head.bias"] = r(K, D), r(K)
    return s


def _same(got, want):
    assert sorted(got) == sorted(want)
    for k in want:
        a, b = got[k], want[k]
        if isinstance(b, np.ndarray):
            assert isinstance(a, np.ndarray) and a.dtype == np.float32 and a.shape == b.shape, k
            assert np.array_equal(a, b), k
        else:
            assert a.dtype == b.dtype and a.shape == b.shape and torch.equal(a, b), k


# ---- detect_format -------------------------------------------------------------------------------------------
@pytest.mark.parametrize("keys,fmt", [
    (["embedding/kernel", "embedding/bias", "cls"], "npz"),
    (["opt/target/embedding/kernel", "opt/target/cls"], "npz"),
    (["vit.embeddings.patch_embeddings.projection.weight", "classifier.weight"], "hf"),
    (["embeddings.patch_embeddings.projection.weight", "pooler.dense.weight"], "hf"),
    (["conv_proj.weight", "class_token", "encoder.layers.encoder_layer_0.ln_1.weight"], "torchvision"),
    (["conv_proj.weight", "class_token"], None),  # torchvision needs its encoder layers too
    (["encoder.layers.encoder_layer_0.ln_1.weight"], None),
    (["patch_embed.proj.weight", "cls_token", "blocks.0.norm1.weight"], "timm"),
    (["model.patch_embed.proj.weight"], None),
    (["something.else"], None),
    ([], None),
])
def test_detect_format(keys, fmt):
    assert detect_format(keys) == fmt
    assert detect_format(iter(keys)) == fmt  # any iterable of names, read once


def test_block_count_is_one_more_than_the_highest_index():
    assert convert._blocks({"blocks.0.a": 0, "blocks.3.b": 0, "blocks.12x": 0}, r"blocks\.(\d+)\.") == 4
    assert convert._blocks({"norm.weight": 0}, r"blocks\.(\d+)\.") == 0


# ---- timm ----------------------------------------------------------------------------------------------------
def test_from_timm_passes_a_plain_state_through():
    s = _timm()
    out, hints = from_timm(s)
    assert hints == {} and out.keys() == s.keys() and all(out[k] is s[k] for k in s)
    back = to_timm(out)
    _same(back, s)
    assert back is not out


def test_from_timm_drops_the_mae_decoder_and_pre_logits(caplog):
    s = _timm()
    extra = {"decoder_embed.weight": torch.ones(2), "decoder_blocks.0.norm1.weight": torch.ones(2),
             "mask_token": torch.ones(1, 1, D), "pre_logits.fc.weight": torch.ones(D, D)}
    with caplog.at_level(logging.INFO, logger="vitkit.io.convert"):
        out, hints = from_timm({**extra, **s})  # dropped keys first: the encoder's keys after them still come
    _same(out, s)
    assert hints == {} and "dropped 4 tensors that are not part of the ViT encoder (decoder_embed.weight" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="vitkit.io.convert"):
        out, _ = from_timm({"pre_logits.fc.bias": torch.ones(D), **s})
    _same(out, s)
    assert "dropped 1 tensors that are not part of the ViT encoder (pre_logits.fc.bias" in caplog.text


def test_from_timm_renames_deit3_layerscale():
    s = _timm()
    g1, g2 = torch.randn(D), torch.randn(D)
    out, _ = from_timm({**s, "blocks.1.gamma_1": g1, "blocks.1.gamma_2": g2})
    assert out["blocks.1.ls1.gamma"] is g1 and out["blocks.1.ls2.gamma"] is g2
    assert "blocks.1.gamma_1" not in out and "blocks.1.gamma_2" not in out


def test_deit_distillation_token_is_the_register_token_and_back():
    s = _timm(pos_rows=N + 2)
    dist = torch.randn(1, 1, D)
    deit = {**s, "dist_token": dist, "head_dist.weight": torch.randn(K, D), "head_dist.bias": torch.randn(K)}
    out, hints = from_timm(deit)
    assert hints == {"distilled": True} and out["reg_token"] is dist and "dist_token" not in out
    assert "dist_token" in deit  # the caller's dict is left alone
    back = to_timm(out, distilled=True)
    _same(back, deit)
    assert "reg_token" not in back and "reg_token" in out  # to_timm copies before renaming
    with pytest.raises(CheckpointError, match="both dist_token and reg_token"):
        from_timm({**deit, "reg_token": torch.randn(1, 1, D)})


# ---- Hugging Face --------------------------------------------------------------------------------------------
_HF_V4 = {"norm1": "layernorm_before", "attn.proj": "attention.output.dense", "norm2": "layernorm_after",
          "mlp.fc1": "intermediate.dense", "mlp.fc2": "output.dense"}
_HF_V5 = {"norm1": "layernorm_before", "attn.proj": "attention.o_proj", "norm2": "layernorm_after",
          "mlp.fc1": "mlp.fc1", "mlp.fc2": "mlp.fc2"}


def _hf(s, p="vit.", v5=False, head=True):
    """REFERENCE.md B2 by hand: HF keys from a timm state, q/k/v the three row blocks of qkv."""
    hf = {f"{p}embeddings.patch_embeddings.projection.weight": s["patch_embed.proj.weight"],
          f"{p}embeddings.position_embeddings": s["pos_embed"],
          f"{p}layernorm.weight": s["norm.weight"], f"{p}layernorm.bias": s["norm.bias"]}
    if "patch_embed.proj.bias" in s:
        hf[f"{p}embeddings.patch_embeddings.projection.bias"] = s["patch_embed.proj.bias"]
    if "cls_token" in s:
        hf[f"{p}embeddings.cls_token"] = s["cls_token"]
    for i in range(DEPTH):
        b = f"blocks.{i}."
        layer = f"{p}layers.{i}." if v5 else f"{p}encoder.layer.{i}."
        names = ("attention.q_proj", "attention.k_proj", "attention.v_proj") if v5 else \
            ("attention.attention.query", "attention.attention.key", "attention.attention.value")
        for j, n in enumerate(names):
            hf[f"{layer}{n}.weight"] = s[b + "attn.qkv.weight"][j * D:(j + 1) * D]
            if b + "attn.qkv.bias" in s:
                hf[f"{layer}{n}.bias"] = s[b + "attn.qkv.bias"][j * D:(j + 1) * D]
        for ours, theirs in (_HF_V5 if v5 else _HF_V4).items():
            hf[f"{layer}{theirs}.weight"], hf[f"{layer}{theirs}.bias"] = s[b + ours + ".weight"], s[b + ours + ".bias"]
    if head and "head.weight" in s:
        hf["classifier.weight"], hf["classifier.bias"] = s["head.weight"], s["head.bias"]
    return hf


def _hf_config(**kw):
    return {"layer_norm_eps": 1e-6, "num_attention_heads": H, "image_size": 4, "hidden_act": "gelu", **kw}


def test_from_hf_classifier_on_disk_layout(caplog):
    s = _timm()
    with caplog.at_level(logging.INFO, logger="vitkit.io.convert"):
        out, hints = from_hf(_hf(s), _hf_config())
    _same(out, s)
    assert hints == {"norm_eps": 1e-6, "num_heads": H, "img_size": 4}
    assert caplog.text == ""  # eps given, no pooler: nothing to say


@pytest.mark.parametrize("v5", [False, True], ids=["disk", "transformers5"])
def test_from_hf_bare_model_drops_the_pooler_and_defaults_eps(v5, caplog):
    s = _timm(head=False)
    hf = _hf(s, p="", v5=v5)
    hf["pooler.dense.weight"], hf["pooler.dense.bias"] = torch.randn(D, D), torch.randn(D)
    with caplog.at_level(logging.INFO, logger="vitkit.io.convert"):
        out, hints = from_hf(hf)
    _same(out, s)
    assert hints == {"norm_eps": 1e-12}  # transformers' default, with a warning
    assert "pooler" in caplog.text and "layer_norm_eps" in caplog.text


def test_from_hf_without_optional_tensors():
    s = _timm(cls=False, qkv_bias=False)
    del s["patch_embed.proj.bias"]
    out, hints = from_hf(_hf(s), {"num_attention_heads": 0, "image_size": 0})
    _same(out, s)
    assert hints == {"norm_eps": 1e-12}  # a zero head count or size is no hint


def test_from_hf_deit_with_teacher():
    s = _timm(pos_rows=N + 2)
    hf = {k.replace("vit.", "deit."): v for k, v in _hf(s, head=False).items()}
    dist, dw, db = torch.randn(1, 1, D), torch.randn(K, D), torch.randn(K)
    hf.update({"deit.embeddings.distillation_token": dist, "cls_classifier.weight": s["head.weight"],
               "cls_classifier.bias": s["head.bias"], "distillation_classifier.weight": dw,
               "distillation_classifier.bias": db})
    out, hints = from_hf(hf, _hf_config())
    _same(out, {**s, "reg_token": dist, "head_dist.weight": dw, "head_dist.bias": db})
    assert hints["distilled"] is True
    # the plain DeiT classifier: one head, not distilled
    plain = {k: v for k, v in hf.items() if "classifier" not in k}
    plain["classifier.weight"], plain["classifier.bias"] = s["head.weight"], s["head.bias"]
    out, hints = from_hf(plain, _hf_config())
    _same(out, {**s, "reg_token": dist})
    assert "distilled" not in hints


def test_from_hf_refuses_another_activation():
    with pytest.raises(CheckpointError, match="hidden_act='gelu_new'.*exact GELU"):
        from_hf(_hf(_timm()), _hf_config(hidden_act="gelu_new"))


def test_to_hf_key_by_key_and_config():
    s = _timm()
    out, cfg = to_hf(s, num_heads=H, embed_dim=D, depth=DEPTH, mlp_dim=F, img_size=4, patch_size=P, in_chans=C,
                     norm_eps=1e-6, qkv_bias=True, class_names=list("abcde"))
    _same(out, _hf(s))
    names = list("abcde")
    assert cfg == {
        "architectures": ["ViTForImageClassification"], "model_type": "vit", "hidden_size": D,
        "num_hidden_layers": DEPTH, "num_attention_heads": H, "intermediate_size": F, "hidden_act": "gelu",
        "hidden_dropout_prob": 0.0, "attention_probs_dropout_prob": 0.0, "layer_norm_eps": 1e-6, "image_size": 4,
        "patch_size": P, "num_channels": C, "qkv_bias": True, "initializer_range": 0.02, "encoder_stride": P,
        "id2label": {str(i): n for i, n in enumerate(names)}, "label2id": {n: i for i, n in enumerate(names)},
    }
    back, hints = from_hf(out, cfg)
    _same(back, s)
    assert hints == {"norm_eps": 1e-6, "num_heads": H, "img_size": 4}


def test_to_hf_bare_model_no_qkv_bias_and_default_labels():
    s = _timm(head=False, qkv_bias=False)
    out, cfg = to_hf(s, num_heads=H, embed_dim=D, depth=DEPTH, mlp_dim=F, img_size=4, patch_size=P, in_chans=C,
                     norm_eps=1e-12, qkv_bias=False)
    zero_bias = {f"encoder.layer.{i}.attention.attention.{n}.bias": torch.zeros(D)
                 for i in range(DEPTH) for n in ("query", "key", "value")}
    _same(out, {**_hf(s, p=""), **zero_bias})  # HF always has q/k/v biases: zeros are the same model
    assert cfg["architectures"] == ["ViTModel"] and "id2label" not in cfg and "label2id" not in cfg
    # a head with class names of the wrong count gets HF's default labels
    _, cfg = to_hf(_timm(), num_heads=H, embed_dim=D, depth=DEPTH, mlp_dim=F, img_size=4, patch_size=P,
                   in_chans=C, norm_eps=1e-6, qkv_bias=True, class_names=["x"])
    assert cfg["id2label"] == {str(i): f"LABEL_{i}" for i in range(K)}
    assert cfg["label2id"] == {f"LABEL_{i}": i for i in range(K)}


# ---- torchvision ---------------------------------------------------------------------------------------------
def _tv(s, legacy=False, head=True):
    """REFERENCE.md B5 by hand: torchvision's VisionTransformer keys from a timm state."""
    tv = {"class_token": s["cls_token"], "encoder.pos_embedding": s["pos_embed"],
          "conv_proj.weight": s["patch_embed.proj.weight"], "conv_proj.bias": s["patch_embed.proj.bias"],
          "encoder.ln.weight": s["norm.weight"], "encoder.ln.bias": s["norm.bias"]}
    fc1, fc2 = ("mlp.linear_1", "mlp.linear_2") if legacy else ("mlp.0", "mlp.3")
    for i in range(DEPTH):
        b, L = f"blocks.{i}.", f"encoder.layers.encoder_layer_{i}."
        tv[L + "self_attention.in_proj_weight"] = s[b + "attn.qkv.weight"]
        tv[L + "self_attention.in_proj_bias"] = s[b + "attn.qkv.bias"]
        for ours, theirs in (("norm1", "ln_1"), ("attn.proj", "self_attention.out_proj"), ("norm2", "ln_2"),
                             ("mlp.fc1", fc1), ("mlp.fc2", fc2)):
            tv[L + theirs + ".weight"], tv[L + theirs + ".bias"] = s[b + ours + ".weight"], s[b + ours + ".bias"]
    if head:
        tv["heads.head.weight"], tv["heads.head.bias"] = s["head.weight"], s["head.bias"]
    return tv


@pytest.mark.parametrize("legacy", [False, True], ids=["mlp.0/3", "linear_1/2"])
def test_from_torchvision(legacy):
    s = _timm()
    out, hints = from_torchvision(_tv(s, legacy))
    _same(out, s)
    assert hints == {}
    assert detect_format(_tv(s, legacy)) == "torchvision"


def test_from_torchvision_without_a_head_or_with_pre_logits(caplog):
    s = _timm(head=False)
    out, _ = from_torchvision(_tv(s, head=False))
    _same(out, s)
    tv = _tv(_timm())
    tv["heads.pre_logits.weight"], tv["heads.pre_logits.bias"] = torch.randn(D, D), torch.randn(D)
    with caplog.at_level(logging.WARNING, logger="vitkit.io.convert"):
        out, _ = from_torchvision(tv)
    _same(out, s)  # the head reads pre_logits' output: dropped with it
    assert "pre_logits" in caplog.text


# ---- Google npz ----------------------------------------------------------------------------------------------
def _npz(s, prefix="", big_vision=False, scanned=False):
    """REFERENCE.md B3/B4 by hand: Flax kernels [in, out] (the conv HWIO), q/k/v kernels (D, H, Dh) with biases
    (H, Dh), the output kernel (H, Dh, D); vit_jax or big_vision sub-module numbering; blocks stacked if scanned."""
    def a(t):
        return t.numpy().astype(np.float32)

    mha, ln2, mlp = ("MultiHeadDotProductAttention_0", "LayerNorm_1", "MlpBlock_0") if big_vision else \
        ("MultiHeadDotProductAttention_1", "LayerNorm_2", "MlpBlock_3")
    w = {"embedding/kernel": np.transpose(a(s["patch_embed.proj.weight"]), (2, 3, 1, 0)),
         "embedding/bias": a(s["patch_embed.proj.bias"]),
         "Transformer/encoder_norm/scale": a(s["norm.weight"]), "Transformer/encoder_norm/bias": a(s["norm.bias"])}
    if "cls_token" in s:
        w["cls"] = a(s["cls_token"])
    w["pos_embedding" if big_vision else "Transformer/posembed_input/pos_embedding"] = a(s["pos_embed"])
    blocks = []
    for i in range(DEPTH):
        b, blk = f"blocks.{i}.", {}
        qkv = a(s[b + "attn.qkv.weight"])
        qkv_b = a(s[b + "attn.qkv.bias"]) if b + "attn.qkv.bias" in s else np.zeros(3 * D, np.float32)
        for j, n in enumerate(("query", "key", "value")):
            kernel = np.empty((D, H, DH), np.float32)  # kernel[i, h, d] = W[h*Dh + d, i]
            for h in range(H):
                kernel[:, h, :] = qkv[j * D + h * DH:j * D + (h + 1) * DH].T
            blk[f"{mha}/{n}/kernel"], blk[f"{mha}/{n}/bias"] = kernel, qkv_b[j * D:(j + 1) * D].reshape(H, DH)
        proj = a(s[b + "attn.proj.weight"])
        blk[f"{mha}/out/kernel"] = np.stack([proj[:, h * DH:(h + 1) * DH].T for h in range(H)])  # (H, Dh, D)
        blk[f"{mha}/out/bias"] = a(s[b + "attn.proj.bias"])
        blk["LayerNorm_0/scale"], blk["LayerNorm_0/bias"] = a(s[b + "norm1.weight"]), a(s[b + "norm1.bias"])
        blk[f"{ln2}/scale"], blk[f"{ln2}/bias"] = a(s[b + "norm2.weight"]), a(s[b + "norm2.bias"])
        for r in range(2):
            blk[f"{mlp}/Dense_{r}/kernel"] = a(s[b + f"mlp.fc{r + 1}.weight"]).T
            blk[f"{mlp}/Dense_{r}/bias"] = a(s[b + f"mlp.fc{r + 1}.bias"])
        blocks.append(blk)
    for name in blocks[0]:
        if scanned:
            w[f"Transformer/encoderblock/{name}"] = np.stack([blk[name] for blk in blocks])
        else:
            for i, blk in enumerate(blocks):
                w[f"Transformer/encoderblock_{i}/{name}"] = blk[name]
    if "head.weight" in s:
        w["head/kernel"], w["head/bias"] = a(s["head.weight"]).T, a(s["head.bias"])
    return {prefix + k: v for k, v in w.items()}


@pytest.mark.parametrize("prefix", ["", "opt/target/"])
def test_from_npz_vit_jax(prefix):
    s = _timm()
    out, hints = from_npz(_npz(s, prefix))
    _same(out, s)
    assert hints == {"num_heads": H}
    assert detect_format(_npz(s, prefix)) == "npz"


@pytest.mark.parametrize("prefix,scanned", [("params/", False), ("params/", True), ("params/img/", False)])
def test_from_npz_big_vision(prefix, scanned):
    s = _timm(pos_rows=N)  # big_vision: pos-embed over the patches only, added before the class token joins
    out, hints = from_npz(_npz(s, prefix, big_vision=True, scanned=scanned))
    _same(out, s)
    assert hints == {"num_heads": H, "no_embed_class": True}
    # 'gap' pooling: no class token, the mean of the tokens; a (N, D) pos-embed gets its batch axis
    s = _timm(cls=False, head=False)
    w = _npz(s, prefix, big_vision=True, scanned=scanned)
    w[prefix + "pos_embedding"] = w[prefix + "pos_embedding"][0]
    out, hints = from_npz(w)
    _same(out, s)
    assert hints == {"num_heads": H, "no_embed_class": False, "global_pool": "avg"}


def test_from_npz_casts_to_float32():
    s = _timm()
    w = {k: np.asfortranarray(v.astype(np.float64)) for k, v in _npz(s).items()}
    _same(from_npz(w)[0], s)  # float32 tensors, equal values


def test_from_npz_drops_pre_logits_and_empty_heads(caplog):
    s = _timm(head=False)
    w = _npz(_timm())
    w["pre_logits/kernel"], w["pre_logits/bias"] = np.ones((D, D), np.float32), np.ones(D, np.float32)
    with caplog.at_level(logging.WARNING, logger="vitkit.io.convert"):
        out, _ = from_npz(w)
    _same(out, s)
    assert "pre_logits" in caplog.text
    w = _npz(s)
    w["head/kernel"], w["head/bias"] = np.zeros((D, 0), np.float32), np.zeros(0, np.float32)
    _same(from_npz(w)[0], s)  # a zero-class head is no head
    w["head/kernel"], w["head/bias"] = np.full((D, 1), 2, np.float32), np.ones(1, np.float32)
    _same(from_npz(w)[0], {**s, "head.weight": torch.full((1, D), 2.0), "head.bias": torch.ones(1)})  # one class


def test_from_npz_refusals():
    w = _npz(_timm())
    with pytest.raises(CheckpointError, match="no embedding/kernel.*not a Flax ViT"):
        from_npz({"other/" + k: v for k, v in w.items()})
    with pytest.raises(CheckpointError, match="MAP head"):
        from_npz({**w, "MAPHead_0/probe": np.zeros((1, 1, D), np.float32)})
    with pytest.raises(CheckpointError, match=r"shape \(2, 2, 8\); expected an HWIO"):
        from_npz({**w, "embedding/kernel": np.zeros((P, P, D), np.float32)})


@pytest.mark.parametrize("big_vision", [False, True], ids=["vit_jax", "big_vision"])
def test_to_npz_key_by_key_and_back(big_vision):
    s = _timm(pos_rows=N if big_vision else None)
    w = to_npz(s, num_heads=H, depth=DEPTH, big_vision=big_vision)
    _same(w, _npz(s, "params/" if big_vision else "", big_vision=big_vision))
    out, hints = from_npz(w)
    _same(out, s)
    assert hints["num_heads"] == H and hints.get("no_embed_class", False) is big_vision


def test_to_npz_without_qkv_bias_class_token_or_head():
    s = _timm(cls=False, head=False, qkv_bias=False)
    w = to_npz(s, num_heads=H, depth=DEPTH)
    _same(w, _npz(s))  # zero q/k/v biases
    assert not any(k in w for k in ("cls", "head/kernel", "head/bias"))
    s16 = {k: v.to(torch.float16) for k, v in s.items()}
    w16 = to_npz(s16, num_heads=H, depth=DEPTH)
    assert all(v.dtype == np.float32 for v in w16.values())
