"""Token merging's arithmetic (ToMe; Bolya et al., "Token Merging: Your ViT but Faster", ICLR 2023, arXiv 2210.09461),
shared by the eager blocks (`vit.Block.forward_merging`) and the fast path (`fast.py`).

Tokens are split alternately into two sets A and B; each A token is matched to its most similar B token (cosine
similarity of the attention keys, averaged over heads), and the r best-matched A tokens are merged into their
partners by a size-weighted average. Every token carries a size (how many patches it stands for); attention adds
log(size) to the logits ("proportional attention"), and average pooling weighs each token by its size. The first
`num_protected` tokens (class, registers, distillation) are never merged.
"""
from __future__ import annotations

import math
from typing import Callable, List, Optional, Sequence, Tuple, Union

import torch

from ..errors import ConfigError

Merge = Callable[..., torch.Tensor]


def merge_count(n: int, r: int, num_protected: int = 1) -> int:
    """How many of n tokens a step asked to merge r actually merges: at most half of the mergeable ones."""
    return max(0, min(r, (n - num_protected) // 2))


def bipartite_soft_matching(metric: torch.Tensor, r: int, num_protected: int = 1) -> Tuple[Merge, int]:
    """Plan one merge step from the metric (B, N, C): returns (merge, r') where merge maps any (B, N, ...) tensor
    to (B, N - r', ...), reducing the r' merged pairs by 'sum' or 'mean', and r' = min(r, (N - protected) // 2).
    The first `num_protected` tokens are kept as they are, in their places."""
    r = merge_count(metric.shape[1], r, num_protected)
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
        prefix = [unm[:, i // 2: i // 2 + 1] if i % 2 == 0 else dst[:, i // 2: i // 2 + 1]
                  for i in range(num_protected)]
        return torch.cat(prefix + [unm[:, pa:], dst[:, pb:]], dim=1)

    return merge, r


def merge_wavg(merge: Merge, x: torch.Tensor, size: Optional[torch.Tensor]) -> Tuple[torch.Tensor, torch.Tensor]:
    """Merge tokens x (B, N, D) as size-weighted averages; returns the merged tokens and their sizes (B, N', 1)."""
    if size is None:
        size = torch.ones_like(x[..., :1])
    x = merge(x * size, mode="sum")
    size = merge(size, mode="sum")
    return x / size, size


def merge_tokens(x: torch.Tensor, size: Optional[torch.Tensor], keys: torch.Tensor, r: int,
                 num_protected: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """One ToMe step: tokens (B, N, D) with sizes → (B, N - r', D) and sizes, matched on the head-averaged attention
    keys (B, N, Dh)."""
    merge, _ = bipartite_soft_matching(keys, r, num_protected)
    return merge_wavg(merge, x, size)


def size_bias(size: Optional[torch.Tensor], dtype: torch.dtype) -> Optional[torch.Tensor]:
    """Proportional attention's logit bias: log(size) of every key, (B, 1, 1, N) (None while nothing is merged)."""
    if size is None:
        return None
    return size.log().reshape(size.shape[0], 1, 1, size.shape[1]).to(dtype)


def size_weighted_mean(x: torch.Tensor, size: Optional[torch.Tensor]) -> torch.Tensor:
    """Average pooling of tokens (B, N, D) → (B, D), each weighing the patches it stands for (size (B, N, 1))."""
    if size is None:
        return x.mean(dim=1)
    return (x * size).sum(dim=1) / size.sum(dim=1)


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


def token_schedule(n: int, rs: Sequence[int], num_protected: int) -> List[Tuple[int, int]]:
    """(tokens into attention, tokens into the MLP) of each block when block i merges rs[i] of n starting tokens."""
    out = []
    for r in rs:
        after = n - merge_count(n, r, num_protected)
        out.append((n, after))
        n = after
    return out


__all__ = ["bipartite_soft_matching", "merge_wavg", "merge_tokens", "merge_count", "size_bias", "size_weighted_mean",
           "parse_r", "token_schedule"]
