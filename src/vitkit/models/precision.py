"""Reduced-precision inference chosen by measurement: which of fp32, bf16 and int8 `vitkit.optimize` runs.

`precision="auto"` times every candidate this machine can run, on the first batch it is given and at that batch's
size (once: the times are cached per CPU model and shape in `$VITKIT_CACHE/precision.json`), checks each
candidate's outputs against fp32 on that same batch, and keeps the fastest that agrees. fp32 is always a candidate
and always agrees, so `auto` never picks a path slower than fp32 (as measured).

Agreement, against fp32 on the calibration batch (the stated tolerances, `TOLERANCES`):
- relative error ‖y − y_fp32‖ / ‖y_fp32‖ of the outputs (logits or features) at most `rel`;
- logits: the top-1 class equal to fp32's on at least `top1` of the images (rounded down to whole images: with a
  batch under 100, every image);
- features (embeddings): per-image cosine similarity to fp32's at least `cosine`.
"""
from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import logging
import math
import os
import statistics
import tempfile
import time
from pathlib import Path
from typing import Callable, Dict, Optional, Sequence, Tuple

import torch

from ..runtime import cache_dir

log = logging.getLogger(__name__)

PRECISIONS = ("auto", "fp32", "bf16", "int8")
CACHE_VERSION = 1


@dataclasses.dataclass(frozen=True)
class Tolerance:
    rel: float      # relative L2 error of the outputs vs fp32
    top1: float     # fraction of images whose top-1 class equals fp32's (logits)
    cosine: float   # per-image cosine similarity to fp32 (features)


# bf16 keeps 8 bits of mantissa (~0.4% per rounding); int8 ~1/255 of each tensor's range per value. Measured on
# ViT-S/B here: bf16 ~0.5-1% relative error, int8 (dynamic, per channel) 2-4%.
TOLERANCES: Dict[str, Tolerance] = {
    "fp32": Tolerance(rel=1e-4, top1=1.0, cosine=0.9999),
    "bf16": Tolerance(rel=0.03, top1=0.99, cosine=0.999),
    "int8": Tolerance(rel=0.08, top1=0.99, cosine=0.995),
}


def agreement(out: torch.Tensor, ref: torch.Tensor, logits: bool) -> Dict[str, float]:
    """How closely `out` follows the fp32 `ref` (B, ...): relative error, and top-1 agreement (logits) or the
    smallest per-image cosine similarity (features)."""
    out, ref = out.float().flatten(1), ref.float().flatten(1)
    stats = {"rel": float((out - ref).norm() / ref.norm().clamp(min=1e-12))}
    if logits and ref.shape[1] > 1:
        stats["top1"] = float((out.argmax(1) == ref.argmax(1)).float().mean())
    else:
        stats["cosine"] = float(torch.nn.functional.cosine_similarity(out, ref, dim=1).min())
    return stats


def agrees(stats: Dict[str, float], tol: Tolerance, n: int) -> bool:
    """Whether the agreement `stats` on `n` images is within `tol` (top-1: whole images, rounded down)."""
    if not stats["rel"] <= tol.rel:  # NaN fails too
        return False
    if "top1" in stats:
        allowed = math.floor((1.0 - tol.top1) * n + 1e-9)
        return round((1.0 - stats["top1"]) * n) <= allowed
    return stats["cosine"] >= tol.cosine


# ---- what this machine can run ----------------------------------------------------------------------------------
def bf16_native(device: torch.device) -> bool:
    """Whether bf16 matmuls run natively here (AVX512-BF16 or AMX through oneDNN; a GPU that supports bf16)."""
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    if device.type != "cpu":
        return False
    try:
        return bool(torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


def candidates(device: torch.device, backend: str) -> Tuple[str, ...]:
    """The precisions `auto` measures here: fp32, bf16 where the hardware has it, int8 on the CPU's oneDNN path."""
    out = ["fp32"]
    if bf16_native(device):
        out.append("bf16")
    if backend == "onednn":
        out.append("int8")
    return tuple(out)


def unavailable(precision: str, device: torch.device, backend: str) -> Optional[str]:
    """Why `precision` cannot run here (None where it can)."""
    if precision == "bf16" and not bf16_native(device):
        return ("this CPU has no native bf16 matmul (AVX512-BF16 or AMX)" if device.type == "cpu"
                else f"this {device.type} device does not support bf16")
    if precision == "int8" and backend != "onednn":
        return f"int8 runs on the CPU's oneDNN path only (this model runs on the {backend!r} backend)"
    return None


# ---- the timing cache -------------------------------------------------------------------------------------------
@functools.lru_cache(maxsize=None)
def cpu_key() -> str:
    """This CPU for the cache: model name, family/model/stepping and the matmul-relevant ISA flags (one model name
    can cover several generations), PyTorch's version and the thread count is added per entry."""
    info = {}
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if ":" in line:
                    k, v = (s.strip() for s in line.split(":", 1))
                    info.setdefault(k, v)
                if not line.strip() and info:
                    break
    except OSError:
        pass
    flags = sorted(f for f in info.get("flags", "").split() if f.startswith(("avx512", "amx", "avx2", "avx_vnni")))
    parts = [info.get("model name", os.uname().machine if hasattr(os, "uname") else "cpu"),
             f"family {info.get('cpu family', '?')} model {info.get('model', '?')} stepping {info.get('stepping', '?')}",
             hashlib.sha1(" ".join(flags).encode()).hexdigest()[:10]]
    return " | ".join(parts)


def cache_path() -> Path:
    """The measured times: precision.json in vitkit's cache folder ($VITKIT_CACHE, else ~/.cache/vitkit)."""
    return cache_dir() / "precision.json"


def shape_key(signature: str, batch: int, device: torch.device) -> str:
    machine = cpu_key() if device.type == "cpu" else torch.cuda.get_device_name(device)
    return (f"{machine} | torch {torch.__version__} | vitkit {code_key()} | {torch.get_num_threads()} threads | "
            f"{signature} | batch {batch}")


@functools.lru_cache(maxsize=None)
def code_key() -> str:
    """A digest of the code that runs the candidates (the fast path, its quantisation and its C++ kernels): times
    measured by another version of it are not reused."""
    here = Path(__file__).parent
    h = hashlib.sha1()
    for name in ("fast.py", "quantize.py", "kernels.py", "csrc/attention.cpp"):
        try:
            h.update((here / name).read_bytes())
        except OSError:
            h.update(name.encode())
    return h.hexdigest()[:10]


def _read_cache() -> dict:
    try:
        data = json.loads(cache_path().read_text())
    except (OSError, ValueError):
        return {}
    return data.get("entries", {}) if isinstance(data, dict) and data.get("version") == CACHE_VERSION else {}


def _write_cache(key: str, seconds: Dict[str, float]) -> None:
    """Add one entry (atomic replace; a cache that cannot be written is only a lost speed-up)."""
    entries = _read_cache()
    entries[key] = {"seconds": seconds, "measured": time.strftime("%Y-%m-%dT%H:%M:%S")}
    path = cache_path()
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile("w", dir=path.parent, delete=False, suffix=".tmp") as f:
            json.dump({"version": CACHE_VERSION, "entries": entries}, f, indent=1)
        os.replace(f.name, path)
    except OSError as e:
        log.info("could not write the precision cache %s (%s)", path, e)


def medians_in_turns(fns: Dict[str, Callable[[], object]], reps: int, warmup: int = 0) -> Dict[str, float]:
    """Each callable's median seconds over `reps` calls, the callables called in turns (after `warmup` untimed
    turns), so that a machine speeding up or slowing down mid-measurement favours none of them."""
    for _ in range(warmup):
        for f in fns.values():
            f()
    times: Dict[str, list] = {k: [] for k in fns}
    for _ in range(reps):
        for k, f in fns.items():
            t = time.perf_counter()
            f()
            times[k].append(time.perf_counter() - t)
    return {k: statistics.median(v) for k, v in times.items()}


# ---- the choice -------------------------------------------------------------------------------------------------
@dataclasses.dataclass
class Choice:
    """What `auto` measured and picked: printed by the CLI, written to reports and index manifests."""
    precision: str
    seconds: Dict[str, float]                 # per call at the calibration batch's size, per candidate
    agreement: Dict[str, Dict[str, float]]    # per candidate, against fp32 on the calibration batch
    rejected: Dict[str, str]                  # candidate → why it was not kept
    batch: int
    cached: bool                              # the times came from the cache

    def summary(self) -> str:
        """One line: the pick, its speed-up over fp32 and its agreement."""
        ms = ", ".join(f"{p} {1e3 * s:.0f} ms" for p, s in self.seconds.items())
        a = self.agreement.get(self.precision, {})
        agree = "" if self.precision == "fp32" else "; vs fp32: " + ", ".join(
            f"{k} {v:.4f}" if k != "top1" else f"top-1 agreement {100 * v:.1f}%" for k, v in a.items())
        speed = ("" if self.precision == "fp32" or "fp32" not in self.seconds
                 else f", {self.seconds['fp32'] / max(self.seconds[self.precision], 1e-12):.2f}x fp32")
        rej = "".join(f"; {p} not kept: {why}" for p, why in self.rejected.items())
        return (f"precision {self.precision}{speed} (auto, batch {self.batch}: {ms}"
                f"{', cached' if self.cached else ''}{agree}{rej})")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def choose(run: Callable[[str], torch.Tensor], names: Sequence[str], key: str, logits: bool, batch: int,
           reps: int = 3, tolerances: Optional[Dict[str, Tolerance]] = None) -> Choice:
    """Pick the fastest precision of `names` whose outputs agree with fp32's. `run(p)` runs the calibration batch
    in precision `p` and returns the outputs; it is called once per candidate for the agreement check and, where
    the cache has no times for `key`, `reps` more times per candidate, in turns, for the timing (medians)."""
    tolerances = tolerances or TOLERANCES
    outs = {p: run(p) for p in names}  # the first call of each also warms it up
    ref = outs["fp32"]
    cached = _read_cache().get(key, {}).get("seconds", {})
    hit = all(p in cached for p in names)
    if hit:
        seconds = {p: float(cached[p]) for p in names}
    else:
        seconds = medians_in_turns({p: functools.partial(run, p) for p in names}, reps)
        _write_cache(key, seconds)
    stats = {p: agreement(outs[p], ref, logits) for p in names if p != "fp32"}
    rejected = {}
    for p, st in stats.items():
        tol = tolerances[p]
        if not agrees(st, tol, batch):
            what = (f"top-1 agreement {100 * st['top1']:.1f}% < {100 * tol.top1:g}%" if "top1" in st and
                    st["rel"] <= tol.rel else f"cosine {st['cosine']:.4f} < {tol.cosine}" if "cosine" in st and
                    st["rel"] <= tol.rel else f"relative error {st['rel']:.4f} > {tol.rel}")
            rejected[p] = f"outputs differ from fp32 ({what})"
        elif seconds[p] >= seconds["fp32"]:
            rejected[p] = f"not faster than fp32 here ({1e3 * seconds[p]:.0f} vs {1e3 * seconds['fp32']:.0f} ms)"
    kept = [p for p in names if p not in rejected]
    pick = min(kept, key=lambda p: seconds[p])
    return Choice(pick, {p: float(f"{s:.4g}") for p, s in seconds.items()},
                  {p: {k: round(v, 6) for k, v in st.items()} for p, st in stats.items()}, rejected, batch, hit)


__all__ = ["PRECISIONS", "TOLERANCES", "Tolerance", "Choice", "choose", "agreement", "agrees", "candidates",
           "unavailable", "bf16_native", "cpu_key", "cache_path", "shape_key"]
