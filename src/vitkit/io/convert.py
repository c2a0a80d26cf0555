"""Key and tensor mappings between the common ViT checkpoint layouts and vitkit's (= timm's) layout.

Each `from_*` returns `(state, hints)`: a timm-layout state dict and the facts the format records that shapes do
not tell (num_heads, norm_eps, pooling); each `to_*` goes the other way. The layouts are those of
REFERENCE.md §B: timm/DeiT/MAE state dicts, Hugging Face `ViTModel`/`ViTForImageClassification`, Google's Flax
`.npz` (vit_jax and big_vision, scanned or not) and torchvision's `VisionTransformer`.
"""
from __future__ import annotations

import logging
import re
from typing import Dict, Optional, Tuple

import numpy as np
import torch

from ..errors import CheckpointError

log = logging.getLogger(__name__)

State = Dict[str, torch.Tensor]
FORMATS = ("vitkit", "timm", "hf", "npz", "torchvision")


def detect_format(keys) -> Optional[str]:
    """The layout a set of tensor names is in, or None."""
    keys = set(keys)
    if any(k.endswith("embedding/kernel") for k in keys):
        return "npz"
    if any(k.endswith("embeddings.patch_embeddings.projection.weight") for k in keys):
        return "hf"
    if "conv_proj.weight" in keys and any(k.startswith("encoder.layers.") for k in keys):
        return "torchvision"
    if "patch_embed.proj.weight" in keys:
        return "timm"
    return None


def _blocks(state, pattern: str) -> int:
    return 1 + max((int(m.group(1)) for k in state if (m := re.match(pattern, k))), default=-1)


# ---- timm (also DeiT, DeiT-III, MAE) -------------------------------------------------------------------------
def from_timm(state: State) -> Tuple[State, dict]:
    """timm state dict, tolerating DeiT (`dist_token`, `head_dist`), DeiT-III (`gamma_1`) and MAE (decoder)."""
    hints: dict = {}
    out: State = {}
    dropped = []
    for k, v in state.items():
        if k.startswith(("decoder", "mask_token")):  # MAE pre-training decoder, and its mask token
            dropped.append(k)
            continue
        if k.startswith("pre_logits."):  # timm's old representation layer; timm drops it too
            dropped.append(k)
            continue
        k = re.sub(r"^blocks\.(\d+)\.gamma_([12])$", r"blocks.\1.ls\2.gamma", k)  # DeiT-III LayerScale
        out[k] = v
    if dropped:
        log.info("dropped %d tensors that are not part of the ViT encoder (%s, ...)", len(dropped), dropped[0])
    if "dist_token" in out:  # DeiT distilled: the distillation token is our one register token
        if "reg_token" in out:
            raise CheckpointError("a checkpoint with both dist_token and reg_token is not supported")
        out["reg_token"] = out.pop("dist_token")
        hints["distilled"] = True
    return out, hints


def to_timm(state: State, distilled: bool = False) -> State:
    out = dict(state)
    if distilled:
        out["dist_token"] = out.pop("reg_token")
    return out


# ---- Hugging Face transformers ViT ---------------------------------------------------------------------------
_HF_PAIRS = [("norm1", "layernorm_before"), ("attn.proj", "attention.output.dense"), ("norm2", "layernorm_after"),
             ("mlp.fc1", "intermediate.dense"), ("mlp.fc2", "output.dense")]
_HF5_PAIRS = [("norm1", "layernorm_before"), ("attn.proj", "attention.o_proj"), ("norm2", "layernorm_after"),
              ("mlp.fc1", "mlp.fc1"), ("mlp.fc2", "mlp.fc2")]


def from_hf(state: State, config: Optional[dict] = None) -> Tuple[State, dict]:
    """HF ViT keys (the on-disk `encoder.layer.N.attention.attention.query` names, or transformers 5's in-memory
    `layers.N.attention.q_proj`), with or without the `vit.` prefix; q/k/v merged into timm's qkv. HF DeiT
    (`deit.` prefix, `distillation_token`, the teacher model's two classifiers) maps the same way."""
    config = config or {}
    key = next(k for k in state if k.endswith("embeddings.patch_embeddings.projection.weight"))
    p = key[: -len("embeddings.patch_embeddings.projection.weight")]
    v5 = any(k.startswith(f"{p}layers.") for k in state)
    layer, pairs = (f"{p}layers.", _HF5_PAIRS) if v5 else (f"{p}encoder.layer.", _HF_PAIRS)
    qkv_names = ("attention.q_proj", "attention.k_proj", "attention.v_proj") if v5 else \
        ("attention.attention.query", "attention.attention.key", "attention.attention.value")
    out = {"patch_embed.proj.weight": state[f"{p}embeddings.patch_embeddings.projection.weight"],
           "pos_embed": state[f"{p}embeddings.position_embeddings"]}
    if f"{p}embeddings.patch_embeddings.projection.bias" in state:
        out["patch_embed.proj.bias"] = state[f"{p}embeddings.patch_embeddings.projection.bias"]
    if f"{p}embeddings.cls_token" in state:
        out["cls_token"] = state[f"{p}embeddings.cls_token"]
    for i in range(_blocks(state, re.escape(layer) + r"(\d+)\.")):
        L, B = f"{layer}{i}.", f"blocks.{i}."
        out[B + "attn.qkv.weight"] = torch.cat([state[L + n + ".weight"] for n in qkv_names])
        if L + qkv_names[0] + ".bias" in state:
            out[B + "attn.qkv.bias"] = torch.cat([state[L + n + ".bias"] for n in qkv_names])
        for ours, theirs in pairs:
            out[B + ours + ".weight"] = state[L + theirs + ".weight"]
            out[B + ours + ".bias"] = state[L + theirs + ".bias"]
    out["norm.weight"], out["norm.bias"] = state[f"{p}layernorm.weight"], state[f"{p}layernorm.bias"]
    hints: dict = {}
    if f"{p}embeddings.distillation_token" in state:  # HF DeiT: the distillation token is our register token
        out["reg_token"] = state[f"{p}embeddings.distillation_token"]
    if "classifier.weight" in state:
        out["head.weight"], out["head.bias"] = state["classifier.weight"], state["classifier.bias"]
    elif "cls_classifier.weight" in state:  # DeiTForImageClassificationWithTeacher: both heads, averaged
        out["head.weight"], out["head.bias"] = state["cls_classifier.weight"], state["cls_classifier.bias"]
        out["head_dist.weight"] = state["distillation_classifier.weight"]
        out["head_dist.bias"] = state["distillation_classifier.bias"]
        hints["distilled"] = True
    if f"{p}pooler.dense.weight" in state:
        log.info("dropped the HF pooler (dense+tanh on the class token): vitkit's head reads the class token directly")
    hints["norm_eps"] = float(config.get("layer_norm_eps", 1e-12))
    if "layer_norm_eps" not in config:
        log.warning("no config.json with layer_norm_eps: using transformers' default 1e-12")
    if config.get("num_attention_heads"):
        hints["num_heads"] = int(config["num_attention_heads"])
    if config.get("image_size"):
        hints["img_size"] = config["image_size"]
    act = config.get("hidden_act", "gelu")
    if act != "gelu":
        raise CheckpointError(f"this HF ViT uses hidden_act={act!r}; vitkit's ViT uses exact GELU ('gelu') only")
    return out, hints


def to_hf(state: State, num_heads: int, embed_dim: int, depth: int, mlp_dim: int, img_size: int, patch_size: int,
          in_chans: int, norm_eps: float, qkv_bias: bool, class_names=None) -> Tuple[State, dict]:
    """timm layout → HF `ViTForImageClassification` (or `ViTModel` without a head) on-disk keys and config.json."""
    has_head = "head.weight" in state
    p = "vit." if has_head else ""
    out = {f"{p}embeddings.cls_token": state["cls_token"], f"{p}embeddings.position_embeddings": state["pos_embed"],
           f"{p}embeddings.patch_embeddings.projection.weight": state["patch_embed.proj.weight"],
           f"{p}embeddings.patch_embeddings.projection.bias": state["patch_embed.proj.bias"],
           f"{p}layernorm.weight": state["norm.weight"], f"{p}layernorm.bias": state["norm.bias"]}
    D = embed_dim
    for i in range(depth):
        L, B = f"{p}encoder.layer.{i}.", f"blocks.{i}."
        for j, n in enumerate(("query", "key", "value")):
            out[f"{L}attention.attention.{n}.weight"] = state[B + "attn.qkv.weight"][j * D:(j + 1) * D]
            bias = state.get(B + "attn.qkv.bias")
            out[f"{L}attention.attention.{n}.bias"] = bias[j * D:(j + 1) * D] if bias is not None else torch.zeros(D)
        for ours, theirs in _HF_PAIRS:
            out[L + theirs + ".weight"] = state[B + ours + ".weight"]
            out[L + theirs + ".bias"] = state[B + ours + ".bias"]
    num_labels = 0
    if has_head:
        out["classifier.weight"], out["classifier.bias"] = state["head.weight"], state["head.bias"]
        num_labels = int(state["head.weight"].shape[0])
    config = {
        "architectures": ["ViTForImageClassification" if has_head else "ViTModel"], "model_type": "vit",
        "hidden_size": D, "num_hidden_layers": depth, "num_attention_heads": num_heads, "intermediate_size": mlp_dim,
        "hidden_act": "gelu", "hidden_dropout_prob": 0.0, "attention_probs_dropout_prob": 0.0,
        "layer_norm_eps": norm_eps, "image_size": img_size, "patch_size": patch_size, "num_channels": in_chans,
        "qkv_bias": True, "initializer_range": 0.02, "encoder_stride": patch_size,
    }
    if has_head:
        names = list(class_names) if class_names and len(class_names) == num_labels else \
            [f"LABEL_{i}" for i in range(num_labels)]
        config["id2label"] = {str(i): n for i, n in enumerate(names)}
        config["label2id"] = {n: i for i, n in enumerate(names)}
    return out, config


# ---- torchvision ---------------------------------------------------------------------------------------------
def from_torchvision(state: State) -> Tuple[State, dict]:
    """torchvision `vit_b_16`-style keys (`conv_proj`, `encoder.layers.encoder_layer_N`, `heads.head`)."""
    out = {"cls_token": state["class_token"], "pos_embed": state["encoder.pos_embedding"],
           "patch_embed.proj.weight": state["conv_proj.weight"], "patch_embed.proj.bias": state["conv_proj.bias"],
           "norm.weight": state["encoder.ln.weight"], "norm.bias": state["encoder.ln.bias"]}
    for i in range(_blocks(state, r"encoder\.layers\.encoder_layer_(\d+)\.")):
        L, B = f"encoder.layers.encoder_layer_{i}.", f"blocks.{i}."
        fc1, fc2 = ("mlp.0", "mlp.3") if L + "mlp.0.weight" in state else ("mlp.linear_1", "mlp.linear_2")
        for ours, theirs in [("norm1", "ln_1"), ("attn.proj", "self_attention.out_proj"), ("norm2", "ln_2"),
                             ("mlp.fc1", fc1), ("mlp.fc2", fc2)]:
            out[B + ours + ".weight"] = state[L + theirs + ".weight"]
            out[B + ours + ".bias"] = state[L + theirs + ".bias"]
        out[B + "attn.qkv.weight"] = state[L + "self_attention.in_proj_weight"]
        out[B + "attn.qkv.bias"] = state[L + "self_attention.in_proj_bias"]
    if "heads.head.weight" in state:
        if "heads.pre_logits.weight" in state:
            log.warning("dropped torchvision's pre_logits layer (representation_size) and the head that reads it: "
                        "the model comes without a head; pass num_classes for a new one")
        else:
            out["head.weight"], out["head.bias"] = state["heads.head.weight"], state["heads.head.bias"]
    return out, {}


# ---- Google Flax .npz (vit_jax and big_vision) ---------------------------------------------------------------
NPZ_PREFIXES = ("opt/target/", "params/img/", "params/", "")


def _t(a) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(np.asarray(a, dtype=np.float32)))


def from_npz(w: Dict[str, np.ndarray]) -> Tuple[State, dict]:
    """Flax `.npz` → timm layout, as timm's `_load_weights` reads it: HWIO→OIHW, [in,out]→[out,in], per-head
    q/k/v kernels (D, H, Dh) merged into qkv. Handles the `opt/target/`, `params/`, `params/img/` prefixes,
    vit_jax and big_vision sub-module numbering, and scanned checkpoints (blocks stacked on a leading axis)."""
    prefix = next((p for p in NPZ_PREFIXES if f"{p}embedding/kernel" in w), None)
    if prefix is None:
        raise CheckpointError("this .npz has no embedding/kernel (under '', opt/target/, params/ or params/img/); "
                              "it is not a Flax ViT checkpoint")
    w = {k[len(prefix):]: v for k, v in w.items() if k.startswith(prefix)}
    if any(k.startswith("MAPHead_0/") for k in w):
        raise CheckpointError("this checkpoint pools with a MAP head (attention pooling, e.g. SigLIP); vitkit's ViT "
                              "pools by class token or average only")
    hints: dict = {}
    out: State = {}
    k = w["embedding/kernel"]
    if k.ndim != 4:
        raise CheckpointError(f"embedding/kernel has shape {k.shape}; expected an HWIO conv kernel")
    out["patch_embed.proj.weight"] = _t(k).permute(3, 2, 0, 1).contiguous()
    out["patch_embed.proj.bias"] = _t(w["embedding/bias"])
    if "cls" in w:
        out["cls_token"] = _t(w["cls"])
    if "pos_embedding" in w:  # big_vision: added to the patches before the class token joins them
        out["pos_embed"] = _t(w["pos_embedding"])
        hints["no_embed_class"] = "cls" in w
    else:
        out["pos_embed"] = _t(w["Transformer/posembed_input/pos_embedding"])
    if out["pos_embed"].ndim == 2:
        out["pos_embed"] = out["pos_embed"][None]
    scanned = "Transformer/encoderblock/LayerNorm_0/scale" in w
    if scanned:
        depth = int(w["Transformer/encoderblock/LayerNorm_0/scale"].shape[0])
    else:
        depth = _blocks(w, r"Transformer/encoderblock_(\d+)/")
    bp0 = "Transformer/encoderblock/" if scanned else "Transformer/encoderblock_0/"
    mha, ln2, mlp = ("MultiHeadDotProductAttention_1", "LayerNorm_2", "MlpBlock_3") \
        if f"{bp0}MultiHeadDotProductAttention_1/query/kernel" in w else \
        ("MultiHeadDotProductAttention_0", "LayerNorm_1", "MlpBlock_0")
    for i in range(depth):
        bp = bp0 if scanned else f"Transformer/encoderblock_{i}/"

        def g(name):
            a = w[bp + name]
            return _t(a[i] if scanned else a)

        B = f"blocks.{i}."
        qkv = [g(f"{mha}/{n}/kernel") for n in ("query", "key", "value")]  # (D, H, Dh) each
        hints["num_heads"] = int(qkv[0].shape[1])
        out[B + "attn.qkv.weight"] = torch.cat([q.flatten(1).T for q in qkv])
        out[B + "attn.qkv.bias"] = torch.cat([g(f"{mha}/{n}/bias").reshape(-1) for n in ("query", "key", "value")])
        out[B + "attn.proj.weight"] = g(f"{mha}/out/kernel").permute(2, 0, 1).flatten(1)  # (H, Dh, D) → (D, H·Dh)
        out[B + "attn.proj.bias"] = g(f"{mha}/out/bias")
        out[B + "norm1.weight"], out[B + "norm1.bias"] = g("LayerNorm_0/scale"), g("LayerNorm_0/bias")
        out[B + "norm2.weight"], out[B + "norm2.bias"] = g(f"{ln2}/scale"), g(f"{ln2}/bias")
        for r in range(2):
            out[B + f"mlp.fc{r + 1}.weight"] = g(f"{mlp}/Dense_{r}/kernel").T.contiguous()
            out[B + f"mlp.fc{r + 1}.bias"] = g(f"{mlp}/Dense_{r}/bias")
    out["norm.weight"] = _t(w["Transformer/encoder_norm/scale"])
    out["norm.bias"] = _t(w["Transformer/encoder_norm/bias"])
    if "pre_logits/kernel" in w:
        log.warning("dropped the pre_logits layer (an in21k representation layer, as timm does) and the head that "
                    "reads it: the model comes without a head; pass num_classes for a new one")
    elif "head/kernel" in w and w["head/kernel"].shape[-1] > 0:
        out["head.weight"] = _t(w["head/kernel"]).T.contiguous()
        out["head.bias"] = _t(w["head/bias"])
    if "cls_token" not in out:
        hints["global_pool"] = "avg"  # 'gap': the mean of the normed tokens, so no fc_norm
    return out, hints


def to_npz(state: State, num_heads: int, depth: int, big_vision: bool = False) -> Dict[str, np.ndarray]:
    """timm layout → Flax `.npz` arrays: the vit_jax layout (which timm's `_load_weights` reads), or with
    `big_vision=True` the big_vision one (`params/` prefix, pos-embed at the root without class slot)."""
    def n(t):
        return t.detach().float().cpu().numpy()

    p = "params/" if big_vision else ""
    mha, ln2, mlp = ("MultiHeadDotProductAttention_0", "LayerNorm_1", "MlpBlock_0") if big_vision else \
        ("MultiHeadDotProductAttention_1", "LayerNorm_2", "MlpBlock_3")
    D = int(state["patch_embed.proj.weight"].shape[0])
    H, Dh = num_heads, D // num_heads
    w = {f"{p}embedding/kernel": n(state["patch_embed.proj.weight"].permute(2, 3, 1, 0)),
         f"{p}embedding/bias": n(state["patch_embed.proj.bias"])}
    if "cls_token" in state:
        w[f"{p}cls"] = n(state["cls_token"])
    w[f"{p}pos_embedding" if big_vision else f"{p}Transformer/posembed_input/pos_embedding"] = n(state["pos_embed"])
    for i in range(depth):
        bp, B = f"{p}Transformer/encoderblock_{i}/", f"blocks.{i}."
        qkv_w, qkv_b = state[B + "attn.qkv.weight"], state.get(B + "attn.qkv.bias")
        for j, name in enumerate(("query", "key", "value")):
            w[f"{bp}{mha}/{name}/kernel"] = n(qkv_w[j * D:(j + 1) * D].T.reshape(D, H, Dh))
            b = qkv_b[j * D:(j + 1) * D] if qkv_b is not None else torch.zeros(D)
            w[f"{bp}{mha}/{name}/bias"] = n(b.reshape(H, Dh))
        w[f"{bp}{mha}/out/kernel"] = n(state[B + "attn.proj.weight"].reshape(D, H, Dh).permute(1, 2, 0))
        w[f"{bp}{mha}/out/bias"] = n(state[B + "attn.proj.bias"])
        for ours, theirs in (("norm1", "LayerNorm_0"), ("norm2", ln2)):
            w[f"{bp}{theirs}/scale"] = n(state[B + ours + ".weight"])
            w[f"{bp}{theirs}/bias"] = n(state[B + ours + ".bias"])
        for r in range(2):
            w[f"{bp}{mlp}/Dense_{r}/kernel"] = n(state[B + f"mlp.fc{r + 1}.weight"].T)
            w[f"{bp}{mlp}/Dense_{r}/bias"] = n(state[B + f"mlp.fc{r + 1}.bias"])
    w[f"{p}Transformer/encoder_norm/scale"] = n(state["norm.weight"])
    w[f"{p}Transformer/encoder_norm/bias"] = n(state["norm.bias"])
    if "head.weight" in state:
        w[f"{p}head/kernel"] = n(state["head.weight"].T)
        w[f"{p}head/bias"] = n(state["head.bias"])
    return w
