"""Token merging (ToMe; Bolya et al., "Token Merging: Your ViT but Faster", ICLR 2023, arXiv 2210.09461).

In each block, after attention, the tokens are split alternately into two sets A and B; each A token is matched to
its most similar B token (cosine similarity of the attention keys, averaged over heads), and the r best-matched
A tokens are merged into their partners by a size-weighted average. Every token carries a size (how many patches
it stands for); attention adds log(size) to the logits ("proportional attention") so a merged token weighs as much
as the tokens it replaced. Prefix tokens (class, registers) are never merged. No training is needed; the FLOPs
drop roughly in proportion to the tokens removed.

`apply_tome(model, r)` turns a `VisionTransformer` into a `ToMeVisionTransformer` in place (same parameters, same
state dict); `remove_tome(model)` turns it back. r=0 gives exactly the plain model's outputs.
"""
from __future__ import annotations

import math
from typing import Callable, List, Optional, Sequence, Tuple, Union

import torch
import torch.nn.functional as F

from ..errors import ConfigError
from .vit import Attention, Block, VisionTransformer


def bipartite_soft_matching(
    metric: torch.Tensor, r: int, num_protected: int = 1
) -> Tuple[Callable[[torch.Tensor, str], torch.Tensor], int]:
    """Plan one merge step from the metric (B, N, C): returns (merge, r') where merge maps any (B, N, ...) tensor
    to (B, N - r', ...), reducing the r' merged pairs by 'sum' or 'mean', and r' = min(r, (N - protected) // 2).
    The first `num_protected` tokens are kept as they are, in their places."""
    t = metric.shape[1]
    r = min(r, (t - num_protected) // 2)
    if r <= 0:
        return (lambda x, mode="mean": x), 0
    pa, pb = (num_protected + 1) // 2, num_protected // 2  # protected tokens landing in A (even) and B (odd)
    with torch.no_grad():
        metric = metric / metric.norm(dim=-1, keepdim=True)
        a, b = metric[:, ::2], metric[:, 1::2]
        scores = a @ b.transpose(-1, -2)  # (B, |A|, |B|) cosine similarities
        if pa:
            scores[:, :pa, :] = -math.inf  # protected A tokens are never merged away
        if pb:
            scores[:, :, :pb] = -math.inf  # protected B tokens never receive a merge
        node_max, node_idx = scores.max(dim=-1)
        edge_idx = node_max.argsort(dim=-1, descending=True)[..., None]
        unm_idx = edge_idx[:, r:].sort(dim=1)[0]  # kept A tokens, in their original order (prefix first)
        src_idx = edge_idx[:, :r]  # A tokens merged away
        dst_idx = node_idx[..., None].gather(dim=1, index=src_idx)  # their partners in B

    def merge(x: torch.Tensor, mode: str = "mean") -> torch.Tensor:
        src, dst = x[:, ::2], x[:, 1::2]
        n, t1, c = src.shape
        unm = src.gather(dim=1, index=unm_idx.expand(n, t1 - r, c))
        src = src.gather(dim=1, index=src_idx.expand(n, r, c))
        dst = dst.scatter_reduce(1, dst_idx.expand(n, r, c), src, reduce=mode)
        if pb == 0:
            return torch.cat([unm, dst], dim=1)
        # put the protected tokens back in their original order: A0, B0, A1, B1, ...
        prefix = [unm[:, i // 2: i // 2 + 1] if i % 2 == 0 else dst[:, i // 2: i // 2 + 1] for i in range(num_protected)]
        return torch.cat(prefix + [unm[:, pa:], dst[:, pb:]], dim=1)

    return merge, r


def merge_wavg(merge: Callable, x: torch.Tensor, size: Optional[torch.Tensor]) -> Tuple[torch.Tensor, torch.Tensor]:
    """Merge tokens x (B, N, D) as size-weighted averages; returns the merged tokens and their sizes (B, N', 1)."""
    if size is None:
        size = torch.ones_like(x[..., :1])
    x = merge(x * size, mode="sum")
    size = merge(size, mode="sum")
    return x / size, size


def parse_r(depth: int, r: Union[int, Sequence[int]]) -> List[int]:
    """Tokens to merge in each block: an int → the same r everywhere; a list → one r per block."""
    if isinstance(r, int):
        if r < 0:
            raise ConfigError(f"tome r must be >= 0, got {r}")
        return [r] * depth
    r = [int(v) for v in r]
    if len(r) != depth or any(v < 0 for v in r):
        raise ConfigError(f"a per-block tome r needs {depth} values >= 0, got {r}")
    return r


def attention_with_keys(
    attn: Attention, x: torch.Tensor, size: Optional[torch.Tensor]
) -> Tuple[torch.Tensor, torch.Tensor]:
    """The `Attention` module's forward with proportional attention (log-size bias over keys); also returns the
    head-averaged keys (B, N, Dh), ToMe's similarity metric."""
    B, N, C = x.shape
    q, k, v = attn.qkv(x).reshape(B, N, 3, attn.num_heads, attn.head_dim).permute(2, 0, 3, 1, 4).unbind(0)
    q, k = attn.q_norm(q), attn.k_norm(k)
    bias = size.log().reshape(B, 1, 1, N).to(q.dtype) if size is not None else None
    y = F.scaled_dot_product_attention(q, k, v, attn_mask=bias, dropout_p=attn.attn_drop.p if attn.training else 0.0)
    y = attn.proj_drop(attn.proj(y.transpose(1, 2).reshape(B, N, C)))
    return y, k.mean(dim=1)


def tome_block(
    blk: Block, x: torch.Tensor, size: Optional[torch.Tensor], r: int, num_protected: int
) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
    """One block with merging between attention and MLP, as in ToMe: (B, N, D) → (B, N - r, D), sizes."""
    if r == 0 and size is None:  # nothing merged yet, nothing to merge: the plain block, bit for bit
        return blk(x), None
    y, metric = attention_with_keys(blk.attn, blk.norm1(x), size)
    x = x + blk.drop_path1(blk.ls1(y))
    if r > 0:
        merge, _ = bipartite_soft_matching(metric, r, num_protected)
        x, size = merge_wavg(merge, x, size)
    x = x + blk.drop_path2(blk.ls2(blk.mlp(blk.norm2(x))))
    return x, size


class ToMeVisionTransformer(VisionTransformer):
    """A `VisionTransformer` that merges `tome_r` tokens per block (set by `apply_tome`; parameters unchanged)."""

    tome_r: Union[int, List[int]] = 0

    def forward_features_sizes(self, x: torch.Tensor) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
        """Images (B, C, H, W) → merged tokens (B, N', D) after the final norm, and their sizes (B, N', 1)."""
        x = self.embed(x)
        size = None
        for blk, r in zip(self.blocks, parse_r(len(self.blocks), self.tome_r)):
            x, size = tome_block(blk, x, size, r, self.num_prefix_tokens)
        return self.norm(x), size

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_features_sizes(x)[0]

    def forward_attention(self, x: torch.Tensor, sink):
        raise ConfigError("attention maps are not defined with token merging; call remove_tome(model) first")

    def forward(self, x: torch.Tensor, return_attention: bool = False):
        if return_attention:
            raise ConfigError("attention maps are not defined with token merging; call remove_tome(model) first")
        x, size = self.forward_features_sizes(x)
        if self.global_pool == "avg" and size is not None:  # a merged token stands for `size` patches
            p = self.num_prefix_tokens
            pooled = (x[:, p:] * size[:, p:]).sum(dim=1) / size[:, p:].sum(dim=1)
            return self.head(self.head_drop(self.fc_norm(pooled)))
        return self.forward_head(x)

    def forward_intermediates(self, *args, **kwargs):
        raise ConfigError("intermediate feature maps are not defined with token merging; call remove_tome(model) first")


def apply_tome(model: VisionTransformer, r: Union[int, Sequence[int]]) -> VisionTransformer:
    """Make `model` merge r tokens in every block (or r[i] in block i), in place; returns the model.
    r=0 gives exactly the plain outputs. Typical r for 224 px, patch 16 (197 tokens, 12 blocks): 8-16."""
    if not isinstance(model, VisionTransformer):
        raise TypeError(f"apply_tome needs a vitkit VisionTransformer, got {type(model).__name__}")
    parse_r(len(model.blocks), r)  # validate now, not at the first forward
    if type(model) is VisionTransformer:
        model.__class__ = ToMeVisionTransformer
    model.tome_r = r if isinstance(r, int) else list(r)
    return model


def remove_tome(model: VisionTransformer) -> VisionTransformer:
    """Undo `apply_tome`, in place."""
    if isinstance(model, ToMeVisionTransformer):
        model.__class__ = VisionTransformer
        del model.tome_r
    return model


def tome_flops(model: VisionTransformer, img_size=None) -> float:
    """Analytic forward FLOPs of one image with the model's current merging schedule (the same matmuls as
    `count_flops`: patch projection, qkv, attention, projection, MLP, head)."""
    cfg = model.config
    size = img_size if img_size is not None else cfg.img_size
    h, w = (size, size) if isinstance(size, int) else size
    n = (h // cfg.patch_size) * (w // cfg.patch_size) + model.num_prefix_tokens
    d, f = cfg.embed_dim, int(cfg.embed_dim * cfg.mlp_ratio)
    rs = parse_r(len(model.blocks), getattr(model, "tome_r", 0))
    macs = (h // cfg.patch_size) * (w // cfg.patch_size) * d * cfg.in_chans * cfg.patch_size**2
    for r in rs:
        macs += n * d * 3 * d + 2 * n * n * d + n * d * d  # qkv, QK^T and AV, projection
        n -= min(r, (n - model.num_prefix_tokens) // 2)
        macs += 2 * n * d * f  # MLP runs on the merged tokens
    macs += d * cfg.num_classes
    return 2.0 * macs


__all__ = ["apply_tome", "remove_tome", "ToMeVisionTransformer", "bipartite_soft_matching", "merge_wavg",
           "tome_flops", "parse_r"]
