"""Calibrated int8 for the oneDNN path: what `vitkit.optimize(precision="int8", calibration=images)` does to the
model before it quantises the linears.

Dynamic per-tensor uint8 activations lose accuracy on real ImageNet weights (ViT-Ti/16: 82.70% → 80.43% top-1) for
two reasons, each measured there:
1. LayerNorm outputs (the inputs of qkv and fc1) and attention outputs (proj's) spread unevenly over channels, so one
   per-tensor scale is too coarse for most of them. SmoothQuant (Xiao et al., 2023) moves that spread into the
   weights: per input channel j, s_j = max|x_j|^α / max|W_:j|^(1-α) from the calibration images; x_j / s_j is folded
   into the LayerNorm's weight and bias (qkv, fc1) or into v's rows of the qkv weight and bias (proj: attention
   output is linear in v), and W_:j · s_j into the linear. Exact in fp32 (`smooth`): nothing changes before
   quantisation, and nothing is added at run time.
2. fc2's input (after GELU) cannot be smoothed (GELU is not linear) and holds "massive activations" (one channel of
   ViT-Ti's block 7 reaches ~215 where the rest stay under ~8), so its per-tensor uint8 step is too coarse. Each
   linear's own int8 error is measured on the calibration images (`layer_errors`, after smoothing); a linear whose
   relative output error exceeds `MAX_LAYER_ERROR` runs in bf16 instead (fp32 where the CPU has no bf16), so the
   mix is chosen by measurement per model, and recorded (`Int8Plan`).
3. With at least `STATIC_MIN_IMAGES` calibration images, each int8 fc2's input gets a fixed (static) uint8 range:
   the smallest and largest GELU output over the images (`fc2_input_ranges`). fc1 then writes its GELU output as
   uint8 straight from its matmul and fc2 reads it, with no fp32 write and no quantise passes in between (the
   largest activation of the block; ViT-S/16's MLP at batch 32 on a 2-core Xeon: 23.2 → 17.4 ms). A new image's value
   beyond the range saturates at it; with n calibration images, a new image's largest value exceeds all of
   theirs with probability at most 1/(n + 1). `layer_errors` measures fc2 with that static range, so a fc2 it
   hurts stays out of int8 as above.
"""
from __future__ import annotations

import dataclasses
from typing import Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn as nn

from ..errors import ConfigError

KINDS = ("qkv", "proj", "fc1", "fc2")
SMOOTH_ALPHA = 0.5   # SmoothQuant's migration strength: 0.5 measured best of {0.5, 0.7} on ViT-Ti/ImageNet
# a linear whose int8 output differs from its fp32 output by more than this (relative L2, on the calibration
# images) stays in bf16. ViT-Ti/16 ImageNet after smoothing: qkv/proj/fc1 1.1-2.6%, fc2 1.9-6.3%; 0.04 keeps 2 of 48
# linears (blocks 6 and 7's fc2) out of int8 for top-1 82.74% (fp32 82.70%), 0.03 keeps 7 for 82.78%.
MAX_LAYER_ERROR = 0.04
# at least this many calibration images give fc2 a static input range (fewer: dynamic, per batch); at 32 a new
# image's largest fc2 input exceeds the calibration's with probability at most 1/33 (and then saturates only by
# that much)
STATIC_MIN_IMAGES = 32


@dataclasses.dataclass
class Int8Plan:
    """Which linears of each block run in int8 and which stay in the higher precision, and the smoothing applied."""
    layers: List[Dict[str, str]]                # per block: kind → "int8" | "bf16" | "fp32"
    errors: List[Dict[str, float]]              # per block: kind → int8 relative output error on the calibration
    alpha: Optional[float] = SMOOTH_ALPHA       # SmoothQuant strength folded in (None: no smoothing)
    images: int = 0                             # calibration images used
    max_error: float = MAX_LAYER_ERROR
    fc2_ranges: Optional[List[Tuple[float, float]]] = None  # per block: fc2's static input range (None: dynamic)

    def counts(self) -> Dict[str, int]:
        out: Dict[str, int] = {}
        for blk in self.layers:
            for p in blk.values():
                out[p] = out.get(p, 0) + 1
        return out

    def summary(self) -> str:
        c = self.counts()
        kept = [f"{i}.{k}" for i, blk in enumerate(self.layers) for k, p in blk.items() if p != "int8"]
        return (f"int8 calibrated on {self.images} images: {c.get('int8', 0)} linears int8"
                + (f", {len(kept)} kept in higher precision ({', '.join(kept)})" if kept else ""))

    def to_dict(self) -> dict:
        return {"int8_layers": self.counts(), "kept": {f"{i}.{k}": p for i, blk in enumerate(self.layers)
                                                     for k, p in blk.items() if p != "int8"},
                "smoothing_alpha": self.alpha, "calibration_images": self.images, "max_layer_error": self.max_error,
                "fc2_input": "static" if self.fc2_ranges is not None else "dynamic"}


def _linears(blk: nn.Module) -> Dict[str, nn.Linear]:
    return {"qkv": blk.attn.qkv, "proj": blk.attn.proj, "fc1": blk.mlp.fc1, "fc2": blk.mlp.fc2}


def _check_images(model: nn.Module, images) -> torch.Tensor:
    if not isinstance(images, torch.Tensor) or images.dim() != 4:
        raise ConfigError(f"calibration must be a (B, C, H, W) tensor of preprocessed images, got "
                          f"{type(images).__name__}{tuple(getattr(images, 'shape', ()))}; stack the images first")
    return images.to(next(model.parameters()).device, torch.float32)


def _run_hooked(model: nn.Module, images: torch.Tensor, hook_for, batch: int) -> None:
    """Run `images` through `model` in chunks of `batch` with `hook_for(block, kind)` on each block linear."""
    hooks = [lin.register_forward_hook(hook_for(i, k))
             for i, blk in enumerate(model.blocks) for k, lin in _linears(blk).items()]
    try:
        with torch.inference_mode():
            for s in range(0, images.shape[0], batch):
                model(images[s:s + batch])
    finally:
        for h in hooks:
            h.remove()


def input_ranges(model: nn.Module, images: torch.Tensor, batch: int = 32) -> List[Dict[str, torch.Tensor]]:
    """Per block and linear: the largest |input| per input channel (K,) over the calibration images."""
    out: List[Dict[str, torch.Tensor]] = [{} for _ in model.blocks]

    def hook_for(i, k):
        def hook(mod, inp, _):
            a = inp[0].detach().reshape(-1, inp[0].shape[-1]).abs().amax(0).float()
            out[i][k] = torch.maximum(out[i][k], a) if k in out[i] else a
        return hook
    _run_hooked(model, images, hook_for, batch)
    return out


@torch.no_grad()
def smooth(model: nn.Module, ranges: Sequence[Dict[str, torch.Tensor]], alpha: float = SMOOTH_ALPHA) -> None:
    """Fold SmoothQuant's per-channel factors into `model` in place (exact in fp32): qkv's and fc1's into the
    preceding LayerNorm, proj's into v's rows of qkv. Skips blocks whose norm has no affine weight and bias."""
    for blk, r in zip(model.blocks, ranges):
        lins = _linears(blk)
        C = lins["proj"].weight.shape[1]
        for kind, norm in (("qkv", blk.norm1), ("fc1", blk.norm2), ("proj", None)):
            w = lins[kind].weight
            s = (r[kind].clamp(min=1e-5).pow(alpha) / w.abs().amax(0).clamp(min=1e-5).pow(1 - alpha)).clamp(min=1e-5)
            if kind == "proj":
                qkv = lins["qkv"]
                if qkv.weight.shape[0] != 3 * C or not isinstance(blk.attn.q_norm, nn.Identity):
                    continue
                qkv.weight[2 * C:].div_(s[:, None])
                if qkv.bias is not None:
                    qkv.bias[2 * C:].div_(s)
            else:
                if not isinstance(norm, nn.LayerNorm) or norm.weight is None or norm.bias is None:
                    continue
                norm.weight.div_(s)
                norm.bias.div_(s)
            w.mul_(s[None, :])


def fc2_input_ranges(model: nn.Module, images: torch.Tensor, batch: int = 32) -> List[Tuple[float, float]]:
    """Per block: the range of fc2's input over the calibration images, widened to hold 0 (as the uint8 zero point
    needs): (min(x, 0), max(x, 0))."""
    out: List[List[float]] = [[0.0, 0.0] for _ in model.blocks]

    def hook_for(i, k):
        def hook(mod, inp, _):
            if k == "fc2":
                out[i][0] = min(out[i][0], float(inp[0].min()))
                out[i][1] = max(out[i][1], float(inp[0].max()))
        return hook
    _run_hooked(model, images, hook_for, batch)
    return [(lo, hi) for lo, hi in out]


def static_qparams(lo: float, hi: float) -> Tuple[float, int]:
    """(scale, zero point) of uint8 over [lo, hi] (lo <= 0 <= hi), as the dynamic path computes them from a range."""
    s = (hi - lo) / 255.0 or 0.1
    return s, round(min(255.0, max(0.0, -lo / s)))


def fake_int8(x: torch.Tensor, w: torch.Tensor, rng: Optional[Tuple[float, float]] = None) -> torch.Tensor:
    """x W^T as the int8 path computes it, in fp32: x quantised to uint8 per tensor (over its own min/max, or over
    the static range `rng`, values outside it saturating), W to int8 symmetric per output channel."""
    lo, hi = rng if rng is not None else (min(float(x.min()), 0.0), max(float(x.max()), 0.0))
    s, zp = static_qparams(lo, hi)
    xq = (torch.clamp(torch.round(x / s) + zp, 0, 255) - zp) * s
    ws = w.abs().amax(1, keepdim=True).clamp(min=1e-12) / 127.0
    return xq @ (torch.round(w / ws).clamp(-127, 127) * ws).t()


def layer_errors(model: nn.Module, images: torch.Tensor, batch: int = 32,
                 fc2_ranges: Optional[Sequence[Tuple[float, float]]] = None) -> List[Dict[str, float]]:
    """Per block and linear: ‖int8(x) W − x W‖ / ‖x W‖ over the calibration images (bias left out: it is exact);
    fc2 with its static input range where `fc2_ranges` gives one."""
    sums: List[Dict[str, List[float]]] = [{k: [0.0, 0.0] for k in KINDS} for _ in model.blocks]

    def hook_for(i, k):
        rng = fc2_ranges[i] if fc2_ranges is not None and k == "fc2" else None

        def hook(mod, inp, _):
            x = inp[0].detach().reshape(-1, inp[0].shape[-1]).float()
            y = x @ mod.weight.t()
            sums[i][k][0] += float((fake_int8(x, mod.weight, rng) - y).pow(2).sum())
            sums[i][k][1] += float(y.pow(2).sum())
        return hook
    _run_hooked(model, images, hook_for, batch)
    return [{k: (e / max(n, 1e-30)) ** 0.5 for k, (e, n) in blk.items()} for blk in sums]


def calibrate(model: nn.Module, images, fallback: str = "bf16", alpha: Optional[float] = SMOOTH_ALPHA,
              max_error: float = MAX_LAYER_ERROR, batch: int = 32) -> Int8Plan:
    """Smooth `model` in place (alpha=None: no smoothing) and choose each linear's precision from its measured int8
    error on `images` (B, C, H, W), preprocessed as the model expects: int8 where the error is at most `max_error`,
    else `fallback` ("bf16", or "fp32" where the CPU has no bf16). With at least `STATIC_MIN_IMAGES` images, fc2's
    input range is fixed from them (static) and its error measured with it."""
    images = _check_images(model, images)
    if alpha is not None:
        smooth(model, input_ranges(model, images, batch), alpha)
    ranges = fc2_input_ranges(model, images, batch) if images.shape[0] >= STATIC_MIN_IMAGES else None
    errors = layer_errors(model, images, batch, ranges)
    layers = [{k: "int8" if e <= max_error else fallback for k, e in blk.items()} for blk in errors]
    return Int8Plan(layers, [{k: round(e, 5) for k, e in blk.items()} for blk in errors], alpha,
                    int(images.shape[0]), max_error, ranges)


__all__ = ["Int8Plan", "calibrate", "smooth", "input_ranges", "fc2_input_ranges", "layer_errors", "fake_int8",
           "static_qparams", "SMOOTH_ALPHA", "MAX_LAYER_ERROR", "STATIC_MIN_IMAGES", "KINDS"]
