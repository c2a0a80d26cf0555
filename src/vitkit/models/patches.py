"""Images as sequences of patches, and where each patch sits: patchify/unpatchify and the fixed 2-D sin-cos
position embeddings of MAE and DiT (transcribed from facebookresearch/mae `util/pos_embed.py`)."""
from __future__ import annotations

from typing import Tuple

import torch

from ..errors import ConfigError


def sincos_pos_embed_1d(embed_dim: int, pos: torch.Tensor) -> torch.Tensor:
    """Positions (M,) → (M, embed_dim): [sin(pos·ω), cos(pos·ω)] with ω_i = 1 / 10000^(2i/embed_dim)."""
    if embed_dim % 2:
        raise ConfigError(f"sin-cos position embeddings need an even width, got {embed_dim}")
    omega = 1.0 / 10000 ** (torch.arange(embed_dim // 2, dtype=torch.float64) / (embed_dim / 2.0))
    out = pos.to(torch.float64).reshape(-1)[:, None] * omega[None]
    return torch.cat([torch.sin(out), torch.cos(out)], dim=1)


def sincos_pos_embed_2d(embed_dim: int, grid_size: Tuple[int, int], num_prefix_tokens: int = 0) -> torch.Tensor:
    """Fixed 2-D sin-cos position embedding (prefix + H*W, embed_dim), row-major over the grid, as in MAE and DiT:
    the first half of the channels encodes the column, the second half the row; prefix rows are zero."""
    if embed_dim % 4:
        raise ConfigError(f"2-D sin-cos position embeddings need a width divisible by 4, got {embed_dim}")
    h, w = grid_size
    rows, cols = torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")
    emb = torch.cat([sincos_pos_embed_1d(embed_dim // 2, cols), sincos_pos_embed_1d(embed_dim // 2, rows)], dim=1)
    if num_prefix_tokens:
        emb = torch.cat([torch.zeros(num_prefix_tokens, embed_dim, dtype=emb.dtype), emb], dim=0)
    return emb.float()


def patchify(imgs: torch.Tensor, patch_size: int) -> torch.Tensor:
    """Images (B, C, H, W) → patches (B, H/p * W/p, p*p*C), each patch flattened row by row, channels last."""
    B, C, H, W = imgs.shape
    p = patch_size
    h, w = H // p, W // p
    x = imgs.reshape(B, C, h, p, w, p)
    return torch.einsum("nchpwq->nhwpqc", x).reshape(B, h * w, p * p * C)


def unpatchify(x: torch.Tensor, patch_size: int, grid_size: Tuple[int, int], channels: int) -> torch.Tensor:
    """Patches (B, H/p * W/p, p*p*C) → images (B, C, H, W); the inverse of `patchify`."""
    B = x.shape[0]
    p, (h, w), C = patch_size, grid_size, channels
    x = x.reshape(B, h, w, p, p, C)
    return torch.einsum("nhwpqc->nchpwq", x).reshape(B, C, h * p, w * p)


__all__ = ["sincos_pos_embed_1d", "sincos_pos_embed_2d", "patchify", "unpatchify"]
