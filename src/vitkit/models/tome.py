"""Token merging (ToMe; Bolya et al., "Token Merging: Your ViT but Faster", ICLR 2023, arXiv 2210.09461).

In each block, after attention, the r most similar tokens are merged into their partners by a size-weighted
average; attention adds log(size) to the logits so a merged token weighs as much as the tokens it replaced (the
arithmetic: `merging.py`). Prefix tokens (class, registers, DeiT's distillation token) are never merged. No
training is needed; the FLOPs drop roughly in proportion to the tokens removed.

Merging is an option of the model itself: `apply_tome(model, r)` sets `model.tome_r`, which every ViT in vitkit
(the plain one, the distilled DeiT, the fast path of `vitkit.optimize`) threads through its blocks;
`remove_tome(model)` turns it off. Parameters and state dict are unchanged; r=0 gives exactly the plain outputs.
"""
from __future__ import annotations

from typing import Sequence, Union

from .config import count_flops
from .merging import bipartite_soft_matching, merge_wavg, parse_r, token_schedule
from .vit import VisionTransformer, require_vit


class _MergingOn(type):
    def __instancecheck__(cls, obj) -> bool:
        return isinstance(obj, VisionTransformer) and getattr(obj, "tome_r", None) is not None


class ToMeVisionTransformer(metaclass=_MergingOn):
    """`isinstance(model, ToMeVisionTransformer)`: whether token merging is on in a vitkit ViT (any variant). Kept
    for code written when merging swapped the model's class; there is nothing to build."""

    def __new__(cls, *args, **kwargs):
        raise TypeError("ToMeVisionTransformer is not built: build a VisionTransformer and call apply_tome(model, r)")


def apply_tome(model: VisionTransformer, r: Union[int, Sequence[int]]) -> VisionTransformer:
    """Make `model` merge r tokens in every block (or r[i] in block i), in place; returns the model.
    r=0 gives exactly the plain outputs. Typical r for 224 px, patch 16 (197 tokens, 12 blocks): 8-16."""
    require_vit(model, "apply_tome")
    parse_r(len(model.blocks), r)  # validate now, not at the first forward
    model.tome_r = r if isinstance(r, int) else list(r)
    return model


def remove_tome(model: VisionTransformer) -> VisionTransformer:
    """Undo `apply_tome`, in place."""
    if isinstance(model, VisionTransformer):
        model.tome_r = None
    return model


def tome_flops(model: VisionTransformer, img_size=None) -> float:
    """Analytic forward FLOPs of one image with the model's current merging schedule (`count_flops` given the
    tokens each block's attention and MLP see)."""
    cfg = model.config
    n = count_flops(cfg, img_size)["tokens"]
    schedule = token_schedule(n, parse_r(len(model.blocks), model.tome_r or 0), model.num_prefix_tokens)
    return count_flops(cfg, img_size, block_tokens=schedule)["flops"]


__all__ = ["apply_tome", "remove_tome", "ToMeVisionTransformer", "bipartite_soft_matching", "merge_wavg",
           "tome_flops", "parse_r"]
