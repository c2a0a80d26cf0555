"""vitkit's own CPU kernels (`csrc/attention.cpp`), used by `vitkit.optimize`: exact attention for short sequences
(fp32, and bf16 with bf16 dot products where the CPU has AVX-512 BF16, for the bf16 path), the int8 path's
dynamic uint8 quantisation of each linear's input (`quantize_u8`), the bf16 and int8 paths' linears on oneDNN's
brgemm ukernel with a fused epilogue (`pack_linear_bf16`, `linear_bf16`, `pack_linear_s8`, `linear_u8s8`; see
`fast._Bf16Linear`, `fast._Int8Linear`), their LayerNorm (`layer_norm`), and the measured choice of their attention
among these kernels (the bf16 one on its own tiles or the brgemm ukernel) and PyTorch's bf16 flash attention
(`reduced_attention`).

It is compiled on first use with PyTorch's extension builder (a C++ compiler and ninja, as for torch.compile; ~30 s
once, then loaded from PyTorch's extension cache in about a second). Wherever it cannot be built or fails its
self-check against `scaled_dot_product_attention`, `cpu_attention()` returns None (the reason is logged once) and
the fast path keeps PyTorch's attention. VITKIT_NO_KERNELS=1 turns it off.
"""
from __future__ import annotations

import functools
import logging
import os
import platform
from pathlib import Path
from typing import Optional

import torch
import torch.nn.functional as F

from .precision import medians_in_turns

log = logging.getLogger(__name__)

MAX_TOKENS = 1024  # longer sequences keep the flash kernel (the N' x N scores per thread would leave the caches)
SOURCE = Path(__file__).with_name("csrc") / "attention.cpp"


def _unavailable(reason: str) -> None:
    log.info("vitkit's CPU attention kernel is off (%s); using PyTorch's scaled_dot_product_attention", reason)
    return None


@functools.lru_cache(maxsize=None)
def cpu_attention():
    """The compiled kernel module (`attention(qkv, nq, key_bias=None)`), or None where it cannot run here."""
    if os.environ.get("VITKIT_NO_KERNELS", "") not in ("", "0"):
        return _unavailable("VITKIT_NO_KERNELS is set")
    if platform.machine().lower() not in ("x86_64", "amd64"):
        return _unavailable(f"{platform.machine()} is not x86-64")
    if not torch.backends.mkl.is_available():
        return _unavailable("this PyTorch build has no MKL")
    quiet = logging.getLogger("torch.utils.cpp_extension")  # "No CUDA runtime is found": true, and beside the point
    level = quiet.level
    quiet.setLevel(logging.ERROR)
    try:
        from torch.utils import cpp_extension
    finally:
        quiet.setLevel(level)

    if not cpp_extension.is_ninja_available():
        try:  # the `ninja` wheel (a vitkit dependency) puts its binary beside the interpreter, maybe not on PATH
            import ninja

            os.environ["PATH"] = ninja.BIN_DIR + os.pathsep + os.environ.get("PATH", "")
        except ImportError:
            pass
    if not cpp_extension.is_ninja_available():
        return _unavailable("ninja is not installed (pip install ninja)")
    cap = torch.backends.cpu.get_cpu_capability()  # the vector width PyTorch itself dispatches to here
    isa = {"AVX512": ("AVX512", ["-mavx512f", "-mavx512dq", "-mavx512vl", "-mavx512bw", "-mfma"]),
           "AVX2": ("AVX2", ["-mavx2", "-mfma"])}.get(cap.split()[0] if cap else "", None)
    if isa is None:
        return _unavailable(f"CPU capability {cap!r} has no vectorised build here")
    name, march = isa
    flags = ["-O3", "-fopenmp", f"-DCPU_CAPABILITY={name}", f"-DCPU_CAPABILITY_{name}", *march]
    try:
        log.info("loading vitkit's CPU attention kernel (%s; the first time, it is compiled: ~30 s)", name)
        mod = cpp_extension.load(f"vitkit_attention_{name.lower()}", [str(SOURCE)], extra_cflags=flags,
                                 extra_ldflags=["-fopenmp"], verbose=False)
    except Exception as e:  # noqa: BLE001 - no compiler, missing symbol, ...: keep PyTorch's kernel
        return _unavailable(f"it did not build here: {type(e).__name__}: {str(e).splitlines()[0][:200]}")
    if not _self_check(mod):
        return _unavailable("its self-check against scaled_dot_product_attention failed")
    return mod


def _self_check(mod) -> bool:
    _bf16_off.clear()  # a fresh load (after cpu_attention.cache_clear()) is checked afresh
    _brgemm_off.clear()
    g = torch.Generator().manual_seed(0)
    qkv = torch.randn(2, 37, 3, 3, 16, generator=g)
    bias = torch.randn(2, 37, generator=g)
    q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)
    with torch.inference_mode():
        want = F.scaled_dot_product_attention(q, k, v, attn_mask=bias[:, None, None, :]).transpose(1, 2)
        got = mod.attention(qkv, 37, bias)
        part = mod.attention(qkv, 5, None)
        want_part = F.scaled_dot_product_attention(q[:, :, :5], k, v).transpose(1, 2)
    ok = bool((got - want).abs().max() <= 1e-5 and (part - want_part).abs().max() <= 1e-5)
    if ok and mod.has_bf16():  # bf16 inputs, bf16 dot products: to bf16's precision of these O(1) outputs
        qkv = torch.randn(2, 37, 3, 2, 32, generator=g).bfloat16()
        q, k, v = qkv.float().permute(2, 0, 3, 1, 4).unbind(0)
        with torch.inference_mode():
            want = F.scaled_dot_product_attention(q, k, v, attn_mask=bias[:, None, None, :]).transpose(1, 2)
            got = mod.attention_bf16(qkv, 37, bias, False)
        if not bool((got - want).abs().max() <= 2e-2):
            log.info("vitkit's bf16 attention failed its self-check here; bf16 models use the fp32 attention kernel")
            _bf16_off.append(True)
        elif mod.bf16_linear_available():
            with torch.inference_mode():
                got = mod.attention_bf16(qkv, 37, bias, False, True)
            if not bool((got - want).abs().max() <= 2e-2):
                log.info("vitkit's brgemm bf16 attention failed its self-check here; it is not used")
                _brgemm_off.append(True)
    x = torch.randn(3, 1000, generator=g) * 3 + 1
    import warnings

    with warnings.catch_warnings():  # PyTorch's quantized-tensor API warns that it is deprecated
        warnings.simplefilter("ignore", UserWarning)
        ref = torch.quantize_per_tensor_dynamic(x, torch.quint8, False)
    q, scale, zp = mod.quantize_u8(x)
    return ok and bool(q.dtype == torch.uint8 and abs(scale - ref.q_scale()) <= 1e-6 * ref.q_scale() and
                       zp == ref.q_zero_point() and (q.int() - ref.int_repr().int()).abs().max() <= 1)


_bf16_off: list = []  # set when the bf16 attention failed its self-check
_brgemm_off: list = []  # set when the bf16 attention on the brgemm ukernel failed its self-check


def bf16_attention_available() -> bool:
    """Whether the kernel's bf16 attention (AVX-512 BF16 dot products) runs here: the kernel is built, this CPU has
    the instructions, the self-check passed and VITKIT_NO_BF16_ATTENTION is not set."""
    mod = cpu_attention()
    return (mod is not None and not _bf16_off and mod.has_bf16() and
            os.environ.get("VITKIT_NO_BF16_ATTENTION", "") in ("", "0"))


def sdpa_bf16_available() -> bool:
    """Whether PyTorch's flash attention in bf16 is a candidate here: the CPU runs bf16 natively (AVX-512 BF16 or
    AMX; its bf16 path multiplies through oneDNN's brgemm, on AMX's tiles where the CPU has them) and
    VITKIT_NO_BF16_ATTENTION is not set."""
    from .precision import bf16_native

    return bf16_native(torch.device("cpu")) and os.environ.get("VITKIT_NO_BF16_ATTENTION", "") in ("", "0")


def brgemm_allowed() -> bool:
    """False where VITKIT_NO_BRGEMM is set: every matmul that could run on vitkit's brgemm kernels (the bf16 and int8
    linears, the brgemm attention, blocks in one call) stays on oneDNN's ops, e.g. to compare the two paths."""
    return os.environ.get("VITKIT_NO_BRGEMM", "") in ("", "0")


def brgemm_attention_available() -> bool:
    """Whether the kernel's bf16 attention can multiply on oneDNN's brgemm ukernel here (AMX tiles where the CPU has
    them): the bf16 attention runs, the ukernel runs bf16 here, that variant passed its self-check and
    VITKIT_NO_BRGEMM is not set."""
    return (bf16_attention_available() and not _brgemm_off and brgemm_allowed() and
            bool(cpu_attention().bf16_linear_available()))


ATTENTIONS = ("fp32", "bf16", "bf16-brgemm", "sdpa-bf16")


def reduced_attention(tokens: int, heads: int, head_dim: int) -> str:
    """The attention the bf16 and int8 paths run at this shape, of `ATTENTIONS`: "fp32" (vitkit's fp32 kernel), "bf16"
    (the kernel's AVX-512 BF16 dot products), "bf16-brgemm" (the same kernel's products on oneDNN's brgemm ukernel,
    its softmax in two passes) or "sdpa-bf16" (PyTorch's flash attention in bf16), the fastest of those that run
    here, timed once per process and shape (a few ms, interleaved, medians). Which wins depends on the CPU, not on
    having the instructions: at ViT-S/16's 197 tokens an AMD EPYC ran the bf16 kernel at ~1.7x the fp32 one, an
    Intel Xeon without AMX at 0.6x, and a Xeon with AMX ran the brgemm variant at 1.3x PyTorch's bf16 flash
    attention (133 vs 176 us per ViT-S/16 image), 2.6x the fp32 kernel. "fp32" wherever no bf16 attention can run."""
    bf16 = bf16_attention_available() and head_dim % 16 == 0
    cands = ("fp32",) + (("bf16",) if bf16 else ()) + (
        ("bf16-brgemm",) if bf16 and brgemm_attention_available() else ()) + (
        ("sdpa-bf16",) if sdpa_bf16_available() else ())
    if len(cands) == 1:
        return "fp32"
    return _measured_attention(int(tokens), int(heads), int(head_dim), cands)


@functools.lru_cache(maxsize=None)
def _measured_attention(tokens: int, heads: int, head_dim: int, cands: tuple) -> str:
    mod = cpu_attention()
    tokens = max(1, min(int(tokens), MAX_TOKENS))
    qkv = torch.randn(2, tokens, 3, heads, head_dim, generator=torch.Generator().manual_seed(0))
    qkv16 = qkv.bfloat16()
    runs = {"fp32": lambda: mod.attention(qkv, tokens, None),
            "bf16": lambda: mod.attention_bf16(qkv16, tokens, None, True),
            "bf16-brgemm": lambda: mod.attention_bf16(qkv16, tokens, None, True, True),
            "sdpa-bf16": lambda: sdpa_from_qkv(qkv16)}
    with torch.inference_mode():
        med = medians_in_turns({k: runs[k] for k in cands}, reps=7, warmup=2)
    best = min(med, key=med.get)
    log.info("attention at %d tokens, %d heads of %d: %s per pair of images; %s kept", tokens, heads, head_dim,
             ", ".join(f"{k} {1e3 * v:.3f} ms" for k, v in med.items()), best)
    return best


def sdpa_from_qkv(qkv: torch.Tensor, bias: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Attention of a qkv matmul's output (B, N, 3, H, hd) through PyTorch's `scaled_dot_product_attention`, as
    (B, N, H, hd) (a view: the CPU flash kernel writes its output in that layout); bias (B, N): added to every
    query's scores for that key (ToMe's log-size), kept in fp32 (in bf16 it would round sizes' logs: 4x the error)."""
    q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)
    mask = bias.float()[:, None, None, :] if bias is not None else None
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask).transpose(1, 2)


__all__ = ["cpu_attention", "bf16_attention_available", "brgemm_allowed", "brgemm_attention_available",
           "sdpa_bf16_available",
           "reduced_attention", "sdpa_from_qkv", "ATTENTIONS", "MAX_TOKENS"]
