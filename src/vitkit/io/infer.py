"""The architecture of a timm-layout state dict, read from its tensor shapes.

Shapes tell embed_dim, depth, patch size, in_chans, num_classes, the token grid (from pos_embed), class and
register tokens, qkv bias, QK-norm, LayerScale, MLP width, pre-norm and fc-norm. They do not tell num_heads
(qkv is (3D, D) for any head count) unless QK-norm is present (its weight is (head_dim,)): that comes from an
argument, from a format that records it (HF config, npz kernels), or from a registered config of the same shape.
"""
from __future__ import annotations

import logging
import math
import re
from typing import Dict, Optional

import torch

from ..errors import CheckpointError
from ..models import ViTConfig, get_config, list_models

log = logging.getLogger(__name__)


def _square(n: int) -> Optional[int]:
    r = math.isqrt(n) if n >= 0 else -1
    return r if r >= 1 and r * r == n else None


def _registry_heads(embed_dim: int, depth: int, mlp_ratio: float):
    """(num_heads, names) of the registered configs with this width, depth and MLP ratio."""
    names = [n for n in list_models()
             if (c := get_config(n)).embed_dim == embed_dim and c.depth == depth and c.mlp_ratio == mlp_ratio]
    return sorted({get_config(n).num_heads for n in names}), names


def infer_config(state: Dict[str, torch.Tensor], *, model: Optional[str] = None, num_heads: Optional[int] = None,
                 hints: Optional[dict] = None, source: str = "checkpoint") -> ViTConfig:
    """A `ViTConfig` that the timm-layout `state` loads into with strict=True.

    `hints` are facts a converter read from its format (num_heads, norm_eps, global_pool, ...); `model` names a
    registered config whose num_heads (and nothing the shapes contradict) is taken; `num_heads` wins over both."""
    hints = dict(hints or {})
    if "patch_embed.proj.weight" not in state:
        raise CheckpointError(f"{source} has no patch_embed.proj.weight, so it is not a ViT in timm's layout "
                              f"(first keys: {', '.join(list(state)[:5])})")
    w = state["patch_embed.proj.weight"]
    if w.ndim != 4:
        raise CheckpointError(f"{source}: patch_embed.proj.weight has shape {tuple(w.shape)}; expected a conv "
                              "kernel (D, C, p, p)")
    embed_dim, in_chans, ph, pw = (int(s) for s in w.shape)
    stem, stem_channels = "patch", ()
    convs = sorted({int(m.group(1)) for k in state if (m := re.match(r"patch_embed\.backbone\.(\d+)\.conv\.weight$", k))})
    if convs:  # timm's HybridEmbed(ConvStem) with stride-2 3x3 convs: the patch is 2**(number of convs)
        if any(tuple(state[f"patch_embed.backbone.{i}.conv.weight"].shape[-2:]) != (3, 3) for i in convs) or \
                convs != list(range(len(convs))) or (ph, pw) != (1, 1):
            raise CheckpointError(f"{source}: its convolutional backbone is not a stem of 3x3 convs with a 1x1 "
                                  "projection; vitkit reads only that kind of hybrid ViT")
        stem, stem_channels = "conv", tuple(int(state[f"patch_embed.backbone.{i}.conv.weight"].shape[0])
                                           for i in convs)
        in_chans = int(state["patch_embed.backbone.0.conv.weight"].shape[1])
        ph = pw = 2 ** len(convs)
    if ph != pw:
        raise CheckpointError(f"{source}: non-square patches {ph}x{pw} are not supported")
    depth = 1 + max((int(m.group(1)) for k in state if (m := re.match(r"blocks\.(\d+)\.", k))), default=-1)
    if depth == 0:
        raise CheckpointError(f"{source} has no transformer blocks (no 'blocks.N.' keys)")
    mlp_hidden = int(state["blocks.0.mlp.fc1.weight"].shape[0]) if "blocks.0.mlp.fc1.weight" in state else None
    if mlp_hidden is None:
        raise CheckpointError(f"{source} has no blocks.0.mlp.fc1.weight; it is not a plain ViT")
    class_token = "cls_token" in state
    reg_tokens = int(state["reg_token"].shape[1]) if "reg_token" in state else 0
    prefix = int(class_token) + reg_tokens

    # The token grid from pos_embed: with the prefix slots (timm default) or without (no_embed_class).
    n_pos = int(state["pos_embed"].shape[1]) if "pos_embed" in state else None
    if n_pos is None:
        raise CheckpointError(f"{source} has no pos_embed; vitkit's ViT uses learned absolute position embeddings")
    no_embed_class = hints.get("no_embed_class")
    grid = None
    if "img_size" in hints:
        g = hints["img_size"] if isinstance(hints["img_size"], (tuple, list)) else (hints["img_size"],) * 2
        grid = (int(g[0]) // ph, int(g[1]) // ph)
        if no_embed_class is None:
            no_embed_class = n_pos == grid[0] * grid[1] and prefix > 0
    else:
        if no_embed_class is None:
            if _square(n_pos - prefix):
                no_embed_class = False
            elif prefix and _square(n_pos):
                no_embed_class = True
        if no_embed_class is not None:
            side = _square(n_pos - (0 if no_embed_class else prefix))
            grid = (side, side) if side else None
    if grid is None or grid[0] * grid[1] + (0 if no_embed_class else prefix) != n_pos:
        raise CheckpointError(f"{source}: pos_embed has {n_pos} positions, which is not a square grid "
                              f"(+{prefix} prefix tokens or not) nor the image size its config names; a non-square "
                              "grid cannot be read from a bare state dict: load it into a model built with its "
                              "img_size and save that with vitkit.save")
    img_size = grid[0] * ph if grid[0] == grid[1] else (grid[0] * ph, grid[1] * ph)

    has_head = "head.weight" in state
    num_classes = int(state["head.weight"].shape[0]) if has_head else 0
    fc_norm = "fc_norm.weight" in state
    global_pool = hints.get("global_pool") or ("avg" if fc_norm or not class_token else "token")
    qk_norm = "blocks.0.attn.q_norm.weight" in state
    fields = dict(
        img_size=img_size, patch_size=ph, in_chans=in_chans, num_classes=num_classes, global_pool=global_pool,
        embed_dim=embed_dim, depth=depth, mlp_ratio=mlp_hidden / embed_dim,
        qkv_bias="blocks.0.attn.qkv.bias" in state, qk_norm=qk_norm,
        init_values=1e-5 if "blocks.0.ls1.gamma" in state else None,  # the value is overwritten by the weights
        class_token=class_token, reg_tokens=reg_tokens, no_embed_class=bool(no_embed_class),
        pre_norm="norm_pre.weight" in state, fc_norm=fc_norm if fc_norm != (global_pool == "avg") else None,
        norm_eps=float(hints.get("norm_eps", 1e-6)), stem=stem, stem_channels=stem_channels,
    )

    # num_heads: the argument, then QK-norm's head_dim, then the format's record, then a registered config.
    heads, why = None, ""
    if qk_norm:
        heads, why = embed_dim // int(state["blocks.0.attn.q_norm.weight"].shape[0]), "the QK-norm width"
    if hints.get("num_heads"):
        heads, why = int(hints["num_heads"]), "the checkpoint's own config"
    if model:
        ref = get_config(model)
        clash = [f"{k} {fields[k]} vs {getattr(ref, k)}" for k in ("embed_dim", "depth", "patch_size", "in_chans")
                 if fields[k] != getattr(ref, k)]
        if clash:
            raise CheckpointError(f"{source} does not match model {model!r}: {', '.join(clash)} (checkpoint vs "
                                  "model); pick the config it was trained with, or pass num_heads instead of model")
        heads, why = ref.num_heads, f"model {model!r}"
    if num_heads:
        heads, why = int(num_heads), "the num_heads argument"
    if heads is None:
        found, names = _registry_heads(embed_dim, depth, fields["mlp_ratio"])
        if len(found) == 1:
            heads, why = found[0], f"the registered config of the same shape ({names[0]})"
        else:
            what = (f"registered configs of this shape disagree ({', '.join(names)})" if found else
                    f"no registered config has embed_dim={embed_dim}, depth={depth}")
            raise CheckpointError(
                f"{source}: the number of attention heads cannot be read from the tensor shapes and {what}; "
                f"pass num_heads= (CLI: --num-heads), e.g. {max(1, embed_dim // 64)} for 64-wide heads, "
                "or model= (--model) naming the config it was trained with")
    if embed_dim % heads:
        raise CheckpointError(f"{source}: embed_dim {embed_dim} is not divisible by num_heads {heads} "
                              f"(from {why}); pass the right num_heads")
    log.info("%s: num_heads=%d from %s", source, heads, why)
    fields["num_heads"] = heads
    name = model or ""
    return ViTConfig(name=name, **fields)
