"""Resampling helpers shared by the ViT family: position embeddings to a new grid, patch kernels to a new size.

Both follow timm's numerics exactly (`resample_abs_pos_embed`, `resample_patch_embed`), so weights moved between
resolutions here give the same numbers as in timm.
"""
from __future__ import annotations

import math
from typing import Optional, Sequence, Tuple

import torch
import torch.nn.functional as F

from ..errors import ConfigError


def to_2tuple(x) -> Tuple[int, int]:
    """An int or a pair → a pair of ints."""
    if isinstance(x, (tuple, list)):
        if len(x) != 2:
            raise ConfigError(f"expected an int or a (height, width) pair, got {x!r}")
        return int(x[0]), int(x[1])
    return int(x), int(x)


def resample_abs_pos_embed(
    posemb: torch.Tensor,
    new_size: Sequence[int],
    old_size: Optional[Sequence[int]] = None,
    num_prefix_tokens: int = 1,
    interpolation: str = "bicubic",
    antialias: bool = True,
) -> torch.Tensor:
    """Resample a (1, prefix + H*W, D) position embedding to a (new_h, new_w) grid; prefix rows pass through."""
    num_pos_tokens = posemb.shape[1]
    if old_size is None:
        hw = int(math.sqrt(num_pos_tokens - num_prefix_tokens))
        old_size = (hw, hw)
    if tuple(old_size) == tuple(new_size):
        return posemb
    prefix, grid = posemb[:, :num_prefix_tokens], posemb[:, num_prefix_tokens:]
    dim = grid.shape[-1]
    orig_dtype = grid.dtype
    grid = grid.float().reshape(1, old_size[0], old_size[1], dim).permute(0, 3, 1, 2)
    grid = F.interpolate(grid, size=tuple(new_size), mode=interpolation, antialias=antialias)
    grid = grid.permute(0, 2, 3, 1).reshape(1, -1, dim).to(orig_dtype)
    return torch.cat([prefix, grid], dim=1) if num_prefix_tokens else grid


def resample_patch_embed(
    weight: torch.Tensor, new_size: Sequence[int], interpolation: str = "bicubic", antialias: bool = True
) -> torch.Tensor:
    """FlexiViT resize of a (D, C, p, p) patch kernel: the pseudo-inverse of resizing the patch, so that a resized
    image through the resized kernel gives (nearly) the same embedding."""
    old_size = tuple(weight.shape[-2:])
    new_size = tuple(new_size)
    if old_size == new_size:
        return weight
    n_old = old_size[0] * old_size[1]
    basis = torch.eye(n_old, dtype=torch.float32, device=weight.device).reshape(n_old, 1, *old_size)
    resized = F.interpolate(basis, size=new_size, mode=interpolation, antialias=antialias, align_corners=False)
    resize_mat = resized.squeeze(1).permute(1, 2, 0).reshape(new_size[0] * new_size[1], n_old)
    pinv = torch.linalg.pinv(resize_mat)  # (n_old, n_new)
    d, c = weight.shape[:2]
    out = weight.reshape(d, c, -1).float() @ pinv
    return out.reshape(d, c, *new_size).to(weight.dtype)


def feature_take_indices(num_blocks: int, indices=None) -> Tuple[list, int]:
    """Which block outputs to keep: None → all, int n → the last n, a list → those (negative counts from the end)."""
    if indices is None:
        indices = num_blocks
    if isinstance(indices, int):
        if not 0 < indices <= num_blocks:
            raise ConfigError(f"indices={indices}: must be between 1 and the depth ({num_blocks})")
        take = list(range(num_blocks - indices, num_blocks))
    else:
        take = []
        for i in indices:
            j = num_blocks + i if i < 0 else i
            if not 0 <= j < num_blocks:
                raise ConfigError(f"block index {i} is out of range for a model of depth {num_blocks}")
            take.append(j)
    return take, max(take)
