"""vitkit's own CPU kernels (`csrc/attention.cpp`), used by `vitkit.optimize`: exact attention for short sequences
(fp32, and bf16 with bf16 dot products where the CPU has AVX-512 BF16, for the bf16 path), and the int8 path's
dynamic uint8 quantisation of each linear's input (`quantize_u8`).

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
    x = torch.randn(3, 1000, generator=g) * 3 + 1
    import warnings

    with warnings.catch_warnings():  # PyTorch's quantized-tensor API warns that it is deprecated
        warnings.simplefilter("ignore", UserWarning)
        ref = torch.quantize_per_tensor_dynamic(x, torch.quint8, False)
    q, scale, zp = mod.quantize_u8(x)
    return ok and bool(q.dtype == torch.uint8 and abs(scale - ref.q_scale()) <= 1e-6 * ref.q_scale() and
                       zp == ref.q_zero_point() and (q.int() - ref.int_repr().int()).abs().max() <= 1)


_bf16_off: list = []  # set when the bf16 attention failed its self-check


def bf16_attention_available() -> bool:
    """Whether the kernel's bf16 attention (AVX-512 BF16 dot products) runs here: the kernel is built, this CPU has
    the instructions, the self-check passed and VITKIT_NO_BF16_ATTENTION is not set."""
    mod = cpu_attention()
    return (mod is not None and not _bf16_off and mod.has_bf16() and
            os.environ.get("VITKIT_NO_BF16_ATTENTION", "") in ("", "0"))


def bf16_attention_faster(tokens: int, heads: int, head_dim: int) -> bool:
    """Whether the bf16 attention beats the fp32 one on this CPU at this shape, measured once per process and shape
    (a few ms, interleaved, medians). AVX-512 BF16 dot products run at twice fp32's rate on some CPUs (an AMD EPYC:
    ViT-S/16 int8 1.1x faster with them) and below it on others (an Intel Xeon without AMX: 0.6x at 197 tokens),
    so having the instructions is not enough. False wherever the bf16 kernel cannot run."""
    return bf16_attention_available() and _bf16_measured_faster(int(tokens), int(heads), int(head_dim))


@functools.lru_cache(maxsize=None)
def _bf16_measured_faster(tokens: int, heads: int, head_dim: int) -> bool:
    mod = cpu_attention()
    tokens = max(1, min(int(tokens), MAX_TOKENS))
    qkv = torch.randn(2, tokens, 3, heads, head_dim, generator=torch.Generator().manual_seed(0))
    qkv16 = qkv.bfloat16()
    runs = {"fp32": lambda: mod.attention(qkv, tokens, None), "bf16": lambda: mod.attention_bf16(qkv16, tokens, None,
                                                                                                 True)}
    with torch.inference_mode():
        med = medians_in_turns(runs, reps=7, warmup=2)
    log.info("attention at %d tokens, %d heads of %d: fp32 %.3f ms, bf16 %.3f ms per pair of images; %s kept",
             tokens, heads, head_dim, 1e3 * med["fp32"], 1e3 * med["bf16"],
             "bf16" if med["bf16"] < med["fp32"] else "fp32")
    return med["bf16"] < med["fp32"]


__all__ = ["cpu_attention", "bf16_attention_available", "bf16_attention_faster", "MAX_TOKENS"]
