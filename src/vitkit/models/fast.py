"""`vitkit.optimize(model)`: the fastest exact inference path for a ViT on this machine.

What it does, and why (measured in benchmarks/RESULTS.md):
- eval mode, no autograd bookkeeping (inference_mode);
- optional token merging (`tome_r`, see `vitkit.models.tome`): fewer tokens, fewer FLOPs; the only large gain,
  since on a CPU the kernels leave little headroom;
- torch.compile (inductor) with freezing: the weights become constants, linears run as prepacked oneDNN/MKL
  kernels with the bias/GELU fused in, LayerNorm + residual adds fuse into single loops. Outputs match eager to
  ~1e-6 (fp32; the tests hold them to 1e-4);
- static shapes with padding: a batch smaller than one already compiled is padded to that size and the result
  sliced, so the last, short batch of a data set does not trigger a fresh compile (ViT samples are independent).

Compiling takes ~0.5-1 min per (model, batch size) on 2 cores; it pays off for large evaluations. If compilation
is not possible here (no C++ compiler, unsupported platform), it warns and runs eager.
"""
from __future__ import annotations

import copy
import logging
from typing import Sequence, Union

import torch
import torch.nn as nn

from .tome import apply_tome
from .vit import VisionTransformer

log = logging.getLogger(__name__)


class OptimizedViT(nn.Module):
    """An inference-only wrapper: `forward(x)` → logits, `forward_features(x)` → tokens, `forward_head(t, pre_logits)`,
    `embed_images(x)` → pooled pre-logit features (B, D). The wrapped model is `.model` (a private copy)."""

    def __init__(self, model: VisionTransformer, compile: bool = True, pad_batches: bool = True):
        super().__init__()
        self.model = model.eval().requires_grad_(False)
        self.compiled = compile
        self.pad_batches = pad_batches
        self._fns = {}
        self._sizes = {}  # method name → batch sizes compiled so far
        self.training = False

    def train(self, mode: bool = True) -> "OptimizedViT":
        """Inference only: stays in eval mode (so code that restores `model.train(was_training)` is harmless)."""
        return self

    # the wrapped model's attributes (config, num_classes, ...) stay reachable
    def __getattr__(self, name):
        if name == "model":
            return super().__getattr__(name)
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(self.model, name)

    def _run(self, name: str, fn, x: torch.Tensor) -> torch.Tensor:
        if not self.compiled:
            with torch.inference_mode():
                return fn(x)
        if name not in self._fns:
            self._fns[name] = torch.compile(fn, dynamic=False, options={"freezing": True})
            self._sizes[name] = set()
        b = x.shape[0]
        sizes = self._sizes[name]
        pad_to = min((s for s in sizes if s > b), default=None) if self.pad_batches and b not in sizes else None
        if pad_to is not None:
            x = torch.cat([x, x.new_zeros((pad_to - b,) + x.shape[1:])])
        try:
            with torch.inference_mode():
                out = self._fns[name](x)
        except Exception as e:  # noqa: BLE001 - any backend failure: fall back to the plain model, loudly
            log.warning("torch.compile failed (%s: %s); running the model eagerly", type(e).__name__, e)
            self.compiled = False
            return self._run(name, fn, x[:b])
        sizes.add(x.shape[0])
        return out[:b] if pad_to is not None else out

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Images (B, C, H, W) → logits (B, classes)."""
        return self._run("forward", self.model.forward, x)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """Images (B, C, H, W) → output tokens after the final norm (B, N, D) (N smaller with token merging)."""
        return self._run("forward_features", self.model.forward_features, x)

    def embed_images(self, x: torch.Tensor) -> torch.Tensor:
        """Images (B, C, H, W) → pooled pre-logit features (B, D), what retrieval indexes."""
        return self._run("embed_images", self._embed, x)

    def _embed(self, x: torch.Tensor) -> torch.Tensor:
        return self.model.forward_head(self.model.forward_features(x), pre_logits=True)

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        with torch.inference_mode():
            return self.model.forward_head(x, pre_logits=pre_logits)


def optimize(
    model: VisionTransformer,
    tome_r: Union[int, Sequence[int]] = 0,
    compile: bool = True,
    pad_batches: bool = True,
) -> OptimizedViT:
    """The fastest exact inference version of `model` (left untouched: the result holds a copy).
    tome_r > 0 merges that many tokens per block (ToMe; faster, slightly less accurate); tome_r=0 keeps the exact
    outputs (≤1e-4 from eager, ~1e-6 in practice). compile=False skips torch.compile (no compile wait)."""
    if not isinstance(model, VisionTransformer):
        raise TypeError(f"optimize needs a vitkit VisionTransformer, got {type(model).__name__}")
    model = copy.deepcopy(model)
    if tome_r:
        apply_tome(model, tome_r)
    return OptimizedViT(model, compile=compile, pad_batches=pad_batches)


__all__ = ["optimize", "OptimizedViT"]
