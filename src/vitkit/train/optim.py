"""Optimizer and schedule: AdamW with decay on matrices only, layer-wise lr decay, warm-up + cosine per step, and
the key biases that no gradient should move (`inert_key_biases`)."""
from __future__ import annotations

import math
import re
from typing import Dict, List, Optional, Sequence, Tuple

import torch
from torch import nn


def _layer_id(name: str, num_layers: int) -> int:
    """0 for the embeddings, i+1 for block i, num_layers+1 for the final norm and head (BEiT/timm convention)."""
    if name.startswith(("cls_token", "reg_token", "pos_embed", "patch_embed", "mask_token", "norm_pre")):
        return 0
    m = re.match(r"(?:blocks|encoder\.blocks)\.(\d+)\.", name)
    if m:
        return int(m.group(1)) + 1
    return num_layers + 1


def param_groups(model: nn.Module, weight_decay: float, layer_decay: Optional[float] = None) -> List[Dict]:
    """Parameter groups for AdamW: weight decay on matrices and conv kernels only (not on biases, norms, position
    embeddings, class/register/mask tokens), and with `layer_decay` a learning-rate scale decay**(L+1-layer)
    for fine-tuning (`lr_scale` in each group, applied by `set_lr`)."""
    skip = set(getattr(model, "no_weight_decay", lambda: set())())
    depth = len(getattr(model, "blocks", [])) or 0
    groups: Dict[tuple, Dict] = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        no_wd = p.ndim <= 1 or name in skip or name.split(".")[0] in skip or name.endswith(".bias")
        scale = 1.0
        if layer_decay is not None and layer_decay != 1.0:
            scale = layer_decay ** (depth + 1 - _layer_id(name, depth))
        key = (no_wd, scale)
        g = groups.setdefault(key, {"params": [], "names": [], "weight_decay": 0.0 if no_wd else weight_decay,
                                    "lr_scale": scale})
        g["params"].append(p)
        g["names"].append(name)
    out = []
    for g in groups.values():
        g.pop("names")
        out.append(g)
    return out


def build_optimizer(model: nn.Module, lr: float, weight_decay: float = 0.05, betas=(0.9, 0.999),
                    layer_decay: Optional[float] = None, eps: float = 1e-8) -> torch.optim.AdamW:
    # foreach kernels: fewer, larger ops — noticeably faster than the per-tensor loop on CPU for small models.
    return torch.optim.AdamW(param_groups(model, weight_decay, layer_decay), lr=lr, betas=tuple(betas), eps=eps,
                             foreach=True)


def inert_key_biases(model: nn.Module) -> List[Tuple[torch.Tensor, torch.Tensor]]:
    """(qkv.bias, mask: 0 on its key third, 1 elsewhere) of every attention without QK-norm. Its key bias b_k adds
    q.b_k to all the logits of a query's row, which the softmax cancels: the gradient is exactly 0 in exact
    arithmetic, so what reaches it is rounding noise (different in 1 and N processes) that Adam would scale into
    steps of ~lr. The engine multiplies the gradient by the mask, so b_k stays where it was (BEiT/EVA in timm keep
    it at 0 alike); with QK-norm the keys are normalised after the bias, which then matters and trains. Under FSDP2
    the mask is a DTensor sharded as its parameter is."""
    from ..models.vit import Attention

    out = []
    for m in model.modules():
        if not isinstance(m, Attention) or m.qkv.bias is None or not isinstance(m.k_norm, nn.Identity):
            continue
        p = m.qkv.bias
        d = p.shape[0] // 3
        mask = torch.ones(p.shape, dtype=p.dtype, device=p.device)
        mask[d:2 * d] = 0
        if _is_dtensor(p):
            from torch.distributed.tensor import distribute_tensor

            mask = distribute_tensor(mask, p.device_mesh, p.placements, src_data_rank=None)
        out.append((p, mask))
    return out


def _is_dtensor(t: torch.Tensor) -> bool:
    """A parameter FSDP2 has sharded (a DTensor); False where torch has no distributed support."""
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:
        return False
    return isinstance(t, DTensor)


def cosine_progress(step: int, total: int, warmup: int, anchor: Optional[Sequence[float]] = None) -> float:
    """How far `step` is along the cosine: 0 at the end of warm-up, 1 at `total`. With `anchor` = (step0,
    progress0), set where a time budget moved `total` mid-run, from progress0 at step0 straight on to 1 at the new
    total, so the learning rate stays continuous and never rises again when the machine speeds up."""
    if anchor is not None and step >= anchor[0]:
        s0, p0 = int(anchor[0]), float(anchor[1])
        return min(1.0, p0 + (1.0 - p0) * (step - s0) / max(1, total - s0))
    return min(1.0, max(0, step - warmup) / max(1, total - warmup))


def lr_at(step: int, total: int, warmup: int, base_lr: float, min_lr: float,
          anchor: Optional[Sequence[float]] = None) -> float:
    """Linear warm-up from ~0 to base_lr over `warmup` steps, then cosine down to min_lr at `total` (continued from
    `anchor` after a re-plan: `cosine_progress`)."""
    if step < warmup:
        return base_lr * (step + 1) / warmup
    if total <= warmup:
        return base_lr
    t = cosine_progress(step, total, warmup, anchor)
    return min_lr + 0.5 * (base_lr - min_lr) * (1 + math.cos(math.pi * t))


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    for g in optimizer.param_groups:
        g["lr"] = lr * g.get("lr_scale", 1.0)
