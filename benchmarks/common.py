"""Shared benchmark machinery: interleaved timing with medians, a same-run matmul reference, peak memory.

Timing: the candidates run in turns (A, B, A, B, ...) in one process, each turn preceded by a 2048^3 fp32 matmul (the
faster of MKL and oneDNN here, picked once at the start), so slow drifts of a shared machine hit all of them alike; we report medians, and for "fraction of matmul" the median of
per-turn ratios (the model's GFLOP/s over the matmul GFLOP/s measured just before it).

Peak memory: a fresh child process builds the model, runs the step once unmeasured (the one-time allocations of
a new shape — oneDNN primitives, autograd and thread-pool buffers — would otherwise land on whichever step comes
first), resets the kernel's resident-set high-water mark (`echo 5 > /proc/self/clear_refs`), runs the step again
and reads `VmHWM` from /proc/self/status. The figure is the peak resident memory *above* what the process held just
before the step (so weights and the input are not counted), which captures every allocation torch makes (CPU
tensors live in malloc'd/mmap'd memory). Linux only; where the kernel refuses clear_refs the figure is NaN.
"""
from __future__ import annotations

import json
import os
import platform
import statistics
import subprocess
import sys
import time
from typing import Callable, Dict, List

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "src"))  # run from a checkout without installing


def machine() -> str:
    cpu = platform.processor() or "cpu"
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    return (f"{cpu}; {os.cpu_count()} cores, torch {torch.__version__} ({torch.backends.cpu.get_cpu_capability()}), "
            f"{torch.get_num_threads()} threads; load average {load:.1f} at start")


def bf16_fast() -> bool:
    """Whether this CPU has native bf16 matmul (AVX512-BF16 or AMX), i.e. bf16 is worth measuring."""
    from vitkit.models.precision import bf16_native

    return bf16_native(torch.device("cpu"))


_A = _B = _MM = None
QUICK_MM = 768  # the matmul size of --quick runs (their figures are not judged)


def fp32_gemms(a: torch.Tensor, b: torch.Tensor) -> Dict[str, Callable[[], object]]:
    """Every fp32 GEMM a @ b this build offers: MKL (`torch.mm`) and oneDNN (a prepacked `_linear_pointwise`, the
    kernel vitkit.optimize runs; on AMD EPYC about twice MKL's rate)."""
    out = {"MKL": lambda: torch.mm(a, b)}
    if torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise"):
        w = torch.ops.mkldnn._reorder_linear_weight(b.t().contiguous())
        out["oneDNN"] = lambda: torch.ops.mkldnn._linear_pointwise(a, w, None, "none", [], "")
    return out


def _fastest_gemm(n: int):
    """The fastest fp32 n^3 GEMM here (median of 3 each, in turns): the reference of every 'of matmul' figure, so
    that a fraction above 100% cannot come from comparing with the slower library."""
    global _A, _B
    _A, _B = torch.randn(n, n), torch.randn(n, n)
    cands = fp32_gemms(_A, _B)
    times = {k: [] for k in cands}
    for _ in range(4):
        for k, fn in cands.items():
            t = time.perf_counter()
            fn()
            times[k].append(time.perf_counter() - t)
    best = min(cands, key=lambda k: statistics.median(times[k][1:]))
    print(f"# 'of matmul' reference: fp32 {n}^3 through {best} ("
          + ", ".join(f"{k} {2 * n ** 3 / statistics.median(v[1:]) / 1e9:.0f}" for k, v in times.items())
          + " GFLOP/s)", flush=True)
    return cands[best]


def matmul_seconds(n: int = 2048) -> float:
    global _MM
    if _MM is None or _A is None or _A.shape[0] != n:
        _MM = _fastest_gemm(n)
    t = time.perf_counter()
    with torch.inference_mode():
        _MM()
    return time.perf_counter() - t


def matmul_gflops(n: int = 2048, reps: int = 5) -> float:
    return 2 * n**3 / statistics.median(matmul_seconds(n) for _ in range(reps)) / 1e9


def interleave(fns: Dict[str, Callable[[], object]], reps: int, warmup: int = 1, mm_n: int = 2048) -> Dict[str, dict]:
    """Run each fn `reps` times in turns; returns {name: {"times": [...], "mm_gflops": [...]}} with the matmul
    GFLOP/s measured just before each run."""
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    out = {k: {"times": [], "mm_gflops": []} for k in fns}
    for _ in range(reps):
        for k, fn in fns.items():
            out[k]["mm_gflops"].append(2 * mm_n**3 / matmul_seconds(mm_n) / 1e9)
            t = time.perf_counter()
            fn()
            out[k]["times"].append(time.perf_counter() - t)
    return out


def summarize(r: dict, items_per_call: int, flops_per_call: float = 0.0) -> dict:
    """Median throughput (items/s) and, given the FLOPs of one call, median GFLOP/s and fraction of the matmul."""
    t = statistics.median(r["times"])
    s = {"median_s": t, "items_per_s": items_per_call / t,
         # throughput per matmul GFLOP/s of the same turn: robust to a shared machine's slow drifts
         "norm": statistics.median(items_per_call / ti / mm for ti, mm in zip(r["times"], r["mm_gflops"]))}
    if flops_per_call:
        s["gflops"] = flops_per_call / t / 1e9
        s["frac_matmul"] = statistics.median(flops_per_call / ti / 1e9 / mm for ti, mm in zip(r["times"], r["mm_gflops"]))
        s["mm_gflops"] = statistics.median(r["mm_gflops"])
    return s


_CHILD = r"""
import gc, json, sys
sys.path.insert(0, {src!r})
import torch
torch.set_num_threads({threads})
def _rss(field):
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field):
                return int(line.split()[1]) * 1024
# warm the libraries' lazy one-time set-up (thread pools, oneDNN/MKL buffers) so the first measurement does not
# pay for it: a tiny ViT forward and backward
_w = torch.nn.TransformerEncoderLayer(64, 4, 256, batch_first=True, norm_first=True)
_x = torch.randn(2, 17, 64)
torch.nn.functional.conv2d(torch.randn(2, 3, 32, 32), torch.randn(64, 3, 16, 16), stride=16)
_w(_x).sum().backward()
with torch.inference_mode():
    _w(_x)
    q = torch.randn(2, 4, 17, 16)
    torch.nn.functional.scaled_dot_product_attention(q, q, q)
del _w, _x, q
out = []
for setup, spec in json.loads({specs!r}):
    env = {{"spec": spec, "torch": torch}}
    exec(setup, env)
    env["step"]()  # warm-up at this shape: its one-time allocations are not the step's
    gc.collect()
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # reset the high-water mark (VmHWM) to the current RSS
    except OSError:  # a kernel or sandbox without it: no figure rather than a wrong one
        out.append(None)
    else:
        before = _rss("VmRSS:")
        env["step"]()
        out.append(_rss("VmHWM:") - before)
    del env
    gc.collect()
print("RESULT", json.dumps(out))
"""


def peak_memory(setup, specs: List[dict], timeout: float = 1800) -> List[float]:
    """Peak extra resident memory (bytes) of `step()` after one warm-up call, once per spec, in one fresh process
    (NaN where /proc/self/clear_refs cannot be written). `setup` is Python source (or one per spec) that sees `spec`
    (a dict) and `torch`, builds what it needs and defines step(). The child maps every allocation over 16 KiB with
    its own mmap (MALLOC_MMAP_THRESHOLD_), so freed memory goes back to the kernel at once and one measurement does
    not hide in the heap left by the one before."""
    setups = [setup] * len(specs) if isinstance(setup, str) else list(setup)
    code = _CHILD.format(src=os.path.join(ROOT, "src"), threads=torch.get_num_threads(),
                         specs=json.dumps(list(zip(setups, specs))))
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="16384", MALLOC_TRIM_THRESHOLD_="0")
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=timeout, env=env)
    line = next((l for l in p.stdout.splitlines() if l.startswith("RESULT ")), None)
    if p.returncode or line is None:
        raise RuntimeError(f"memory child failed ({p.returncode}):\n{p.stderr[-3000:]}")
    return [float("nan") if v is None else float(v) for v in json.loads(line[7:])]


def mib(b: float) -> str:
    return f"{b / 2**20:,.0f} MiB" if b == b else "n/a"


def table(rows: List[List[str]], header: List[str]) -> str:
    widths = [max(len(str(x)) for x in col) for col in zip(header, *rows)]
    fmt = lambda r: "| " + " | ".join(str(x).ljust(w) for x, w in zip(r, widths)) + " |"  # noqa: E731
    return "\n".join([fmt(header), "|" + "|".join("-" * (w + 2) for w in widths) + "|"] + [fmt(r) for r in rows])
