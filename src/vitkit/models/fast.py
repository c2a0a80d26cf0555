"""`vitkit.optimize(model)`: the fastest exact inference path for a ViT on this machine.

Backends (`backend="auto"` picks the first that applies; measured in benchmarks/RESULTS.md):
- "onednn" (CPU, fp32, x86 PyTorch with oneDNN): no compile step. Every linear runs as a prepacked oneDNN matmul
  with its epilogue fused: the bias always, GELU after fc1, and the residual add after the attention projection and
  fc2 (LayerScale is folded into those weights). The last block computes its queries, projection and MLP for the
  class/prefix tokens only when the head reads nothing else (`global_pool='token'`): the other tokens' outputs
  there are never used, so skipping them is exact and saves ~1/depth of the model's FLOPs. Attention runs in
  vitkit's own kernel up to 1,024 tokens (`kernels.py`; PyTorch's flash attention beyond, or where the kernel
  cannot be built). Outputs match eager to ~1e-6 (fp32; tests hold them to 1e-4). vit_small/16 at batch 32 on
  2 cores: 88% of the same-run fp32 matmul rate, 1.17x timm compiled with freezing (benchmarks/RESULTS.md).
- "compile": torch.compile (inductor) with freezing: the weights become constants, linears prepacked, norms and
  residual adds fused. For GPUs (with CUDA graphs there: "reduce-overhead") and CPUs without oneDNN. Static
  shapes: a batch smaller than one already compiled is padded to that size and the result sliced, so a data set's
  last, short batch does not recompile.
  Compiling takes ~0.5-1 min per (model, batch size) on 2 cores.
- "eager": the plain model under inference_mode (also what "compile" falls back to, loudly, if compiling fails).

Token merging (`tome_r`, see `vitkit.models.tome`) works with every backend: fewer tokens, fewer FLOPs.

On Linux/glibc, the CPU backends also tune the allocator once per process (`tune_malloc`): a ViT's activations
are tens of MB per matmul, which glibc hands back to the kernel on free and faults in again, page by page, at the
next call (~75k page faults per ViT-S batch of 32, ~7% of its time). Keeping them in the heap costs no speed but
means the process keeps its peak memory. `optimize(..., tune_allocator=False)` leaves malloc alone.
"""
from __future__ import annotations

import copy
import ctypes
import functools
import hashlib
import logging
import sys
import warnings
from typing import List, NamedTuple, Optional, Sequence, Tuple, Union

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..errors import ConfigError
from . import kernels
from .deit import VisionTransformerDistilled
from .layers import resample_abs_pos_embed
from .merging import merge_tokens, parse_r, size_bias
from .precision import PRECISIONS, Choice, bf16_native, candidates, choose, medians_in_turns, shape_key, unavailable
from .quantize import Int8Plan, calibrate, static_qparams
from .tome import apply_tome
from .vit import Block, LayerScale, PatchEmbed, VisionTransformer, require_vit

log = logging.getLogger(__name__)

BACKENDS = ("auto", "onednn", "compile", "eager")
_allocator_tuned = False


def tune_malloc() -> bool:
    """Keep freed memory in the process heap (glibc: no mmap for large blocks, no trimming), so that the large
    activation buffers of a forward pass are reused instead of faulted in page by page at every call. Process-wide
    and permanent; returns whether it applied (glibc only)."""
    global _allocator_tuned
    if _allocator_tuned:
        return True
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL("libc.so.6")
        m_trim_threshold, m_mmap_threshold = -1, -3
        ok = libc.mallopt(m_mmap_threshold, 1 << 30) == 1 and libc.mallopt(m_trim_threshold, (1 << 31) - 1) == 1
    except (OSError, AttributeError):
        return False
    _allocator_tuned = ok
    return ok


def release_heap() -> bool:
    """Hand the heap's free memory back to the OS (glibc's `malloc_trim`) after a one-off large computation: under
    `tune_malloc` the heap is never trimmed by itself, so int8 calibration's batch-32 activations stayed resident
    (ViT-B/16 on 32 images: +1.2 GB RSS on an Intel Xeon). Returns whether it ran (glibc only)."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        return False
    return True


# ---- the oneDNN backend -----------------------------------------------------------------------------------------
def onednn_supported(model: nn.Module) -> Tuple[bool, str]:
    """Whether the "onednn" backend can run this model here, and if not, why."""
    if type(model) not in _ONEDNN_MODELS:
        return False, f"{type(model).__name__} is not a plain ViT classifier"
    p = next(model.parameters())
    if p.device.type != "cpu" or p.dtype != torch.float32:
        return False, f"the model is {p.dtype} on {p.device}, not float32 on the CPU"
    if not (torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")):
        return False, "this PyTorch build has no oneDNN linear kernels"
    for blk in model.blocks:
        if not (isinstance(blk, Block) and isinstance(blk.mlp.fc1, nn.Linear) and isinstance(blk.norm1, nn.LayerNorm)):
            return False, "a block is not the standard pre-norm ViT block"
    try:  # the kernels exist in this build: make sure they run on this CPU
        _PackedLinear(torch.randn(8, 8), torch.randn(8)).add(torch.randn(2, 8), torch.randn(2, 8))
    except (RuntimeError, NotImplementedError) as e:
        return False, f"oneDNN linear failed here ({e})"
    return True, ""


class _PackedLinear:
    """y = x W^T + b [+ other | → activation] as one prepacked oneDNN matmul with a fused epilogue, from a linear
    layer's weight (out, in) and bias. `scale` folds a following per-channel scale (LayerScale) into W and b.
    dtype=torch.bfloat16: weights and bias in bf16, the input cast to bf16, fp32 accumulation inside oneDNN, a bf16
    output; `add` then sums into the fp32 residual stream (which stays fp32, as under autocast)."""

    def __init__(self, weight: torch.Tensor, bias: Optional[torch.Tensor] = None,
                 scale: Optional[torch.Tensor] = None, act: Optional[nn.Module] = None,
                 dtype: torch.dtype = torch.float32):
        w, b = _folded(weight, bias, scale)
        self.dtype = dtype
        self.weight = torch.ops.mkldnn._reorder_linear_weight(w.to(dtype).contiguous())
        self.bias = b.to(dtype).contiguous() if b is not None else None
        self.attr, self.algorithm, self.act = "none", "", None
        if isinstance(act, nn.GELU):  # exact (erf) or tanh GELU run inside the matmul's epilogue
            self.attr, self.algorithm = "gelu", act.approximate
        elif act is not None and not isinstance(act, nn.Identity):
            self.act = act  # any other activation runs after the matmul

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.ops.mkldnn._linear_pointwise(x.to(self.dtype), self.weight, self.bias, self.attr, [],
                                               self.algorithm)
        return self.act(y) if self.act is not None else y

    def add(self, x: torch.Tensor, other: torch.Tensor) -> torch.Tensor:
        """x W^T + b + other (the residual), in one pass in fp32; in bf16, the bf16 product added to the fp32
        residual."""
        if self.dtype != torch.float32:
            return torch.add(other, self(x))
        return torch.ops.mkldnn._linear_pointwise.binary(x, other, self.weight, self.bias, "add")


class _BrgemmLinear:
    """The bf16 linear on vitkit's kernel (`linear_bf16` in csrc/attention.cpp): the weight packed once for oneDNN's
    brgemm ukernel, each output tile finished in registers (bias, exact GELU, the fp32 residual). No per-call
    primitive setup, and `add` writes the fp32 sum with the product unrounded, where the prepacked bf16 linear rounds
    it to bf16 and adds in a separate pass. Takes fp32 or bf16 input (rounded to bf16 inside)."""

    def __init__(self, weight: torch.Tensor, bias: Optional[torch.Tensor] = None,
                 scale: Optional[torch.Tensor] = None, act: Optional[nn.Module] = None):
        w, b = _folded(weight, bias, scale)
        self.mod = kernels.cpu_attention()
        self.weight = self.mod.pack_linear_bf16(w.float())
        self.bias = b.float().contiguous() if b is not None else None
        self.gelu = isinstance(act, nn.GELU) and act.approximate == "none"
        self.act = act if not self.gelu and act is not None and not isinstance(act, nn.Identity) else None

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        y = self.mod.linear_bf16(x, self.weight, self.bias, self.gelu, None, True)
        return self.act(y) if self.act is not None else y

    def add(self, x: torch.Tensor, other: torch.Tensor) -> torch.Tensor:
        if self.act is not None:
            return torch.add(other, self(x))
        return self.mod.linear_bf16(x, self.weight, self.bias, self.gelu, other.contiguous(), False)


def brgemm_linear_available(n: int, k: int) -> bool:
    """Whether vitkit's brgemm bf16 linear runs a (k → n) linear here: the kernel is built, oneDNN's brgemm
    ukernel runs bf16 on this CPU (AMX, or AVX-512 BF16: there vitkit packs the weights, PyTorch only packs for
    AMX), n is a multiple of 64 and k even, and VITKIT_NO_BRGEMM is not set."""
    mod = kernels.cpu_attention()
    return (mod is not None and n % 64 == 0 and k % 2 == 0 and kernels.brgemm_allowed() and
            bool(mod.bf16_linear_available()))


# the brgemm linear is for small matrices, where oneDNN's per-call setup is a large share of each matmul; above this
# many rows its plain tiling loses to oneDNN's blocking (an Intel Xeon with AMX, ViT-S/16 at batch 32, 6,304 rows:
# the whole model 3% slower with it), so larger inputs go to oneDNN unmeasured
BRGEMM_MAX_ROWS = 2048


class _Bf16Linear:
    """A bf16 linear that runs on whichever of oneDNN's prepacked matmul (`_PackedLinear`) and vitkit's brgemm linear
    (`_BrgemmLinear`) measured faster at the call's size (`_brgemm_faster`, once per process per shape and row count
    rounded up to 32, up to `BRGEMM_MAX_ROWS`; oneDNN above). Which wins depends on the CPU, the shape and the
    epilogue: on an Intel Xeon with AMX at ViT-S/16's batch 1, the brgemm linear ran the projection and fc2 with
    their residual adds 2.6-3x faster, and oneDNN the wide matmuls of batch 32. oneDNN's copy of the weight is packed
    only once some call picks it (then both are held, so that each batch size gets its faster one)."""

    def __init__(self, weight, bias=None, scale=None, act=None):
        self._source, self._onednn = (weight, bias, scale, act), None
        self.brgemm = _BrgemmLinear(weight, bias, scale=scale, act=act)
        self.n, self.k = weight.shape
        self.gelu = self.brgemm.gelu
        self._picks: dict = {}  # (rows, add, input dtype) → the linear that runs them

    @property
    def onednn(self) -> _PackedLinear:
        """oneDNN's prepacked linear, packed from the model's weight when first picked: at small batches the brgemm
        linear runs every call, and the second bf16 copy of the weight is never made."""
        if self._onednn is None:
            weight, bias, scale, act = self._source
            self._onednn = _PackedLinear(weight, bias, scale=scale, act=act, dtype=torch.bfloat16)
        return self._onednn

    def _pick(self, x: torch.Tensor, add: bool):
        return self.pick(x.shape[0], add, x.dtype)

    def pick(self, rows: int, add: bool, dtype: torch.dtype):
        """The linear that runs a (rows x k) input of this dtype (with the residual add or not)."""
        key = (rows, add, dtype)
        lin = self._picks.get(key)
        if lin is None:
            fast = _brgemm_measured_faster(rows, _brgemm_faster, self.k, self.n, self.gelu, add,
                                           dtype == torch.bfloat16)
            lin = self._picks[key] = self.brgemm if fast else self.onednn
        return lin

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return self._pick(x, False)(x)

    def add(self, x: torch.Tensor, other: torch.Tensor) -> torch.Tensor:
        return self._pick(x, True).add(x, other)


def _brgemm_measured_faster(rows: int, faster, *shape) -> bool:
    """Whether vitkit's brgemm kernel runs calls of `rows` rows (asked once per linear and row count): never above
    `BRGEMM_MAX_ROWS`, else what `faster(rows rounded up to the kernel's 32-row tiles, *shape)` measured (197 tokens
    are measured as 224 rows)."""
    return rows <= BRGEMM_MAX_ROWS and faster(-(-rows // 32) * 32, *shape)


@functools.lru_cache(maxsize=None)
def _brgemm_faster(rows: int, k: int, n: int, gelu: bool, add: bool, bf16_input: bool) -> bool:
    """Whether the brgemm bf16 linear beats oneDNN's prepacked one for a (rows x k) input to n outputs here (with
    GELU / the residual add / a bf16 input as given): interleaved, medians of 5; a few ms, once per process."""
    g = torch.Generator().manual_seed(0)
    w, x = torch.randn(n, k, generator=g) * 0.05, torch.randn(rows, k, generator=g)
    x = x.bfloat16() if bf16_input else x
    other = torch.randn(rows, n, generator=g) if add else None
    act = nn.GELU() if gelu else None
    lins = {"oneDNN": _PackedLinear(w, act=act, dtype=torch.bfloat16), "brgemm": _BrgemmLinear(w, act=act)}
    runs = {name: (functools.partial(lin.add, x, other) if add else functools.partial(lin, x))
            for name, lin in lins.items()}
    return _brgemm_wins(runs, f"bf16 linear {rows}x{k}x{n}", gelu, add)


def _brgemm_wins(runs: dict, what: str, gelu: bool, add: bool) -> bool:
    """Times runs["oneDNN"] and runs["brgemm"] in turns (medians of 5), logs both and says whether brgemm won."""
    with torch.inference_mode():
        med = medians_in_turns(runs, reps=5, warmup=1)
    won = med["brgemm"] < med["oneDNN"]
    log.info("%s%s: oneDNN %.3f ms, brgemm %.3f ms; %s", what, " + GELU" if gelu else " + residual" if add else "",
             1e3 * med["oneDNN"], 1e3 * med["brgemm"], "brgemm" if won else "oneDNN")
    return won


class _Int8Linear:
    """y = x W^T + b [+ other | → GELU] with W in int8, symmetric per output channel, and x quantised to uint8 per
    call (dynamic, per tensor: its scale follows each batch, nothing to calibrate). oneDNN's int8 matmul
    (`onednn::qlinear_pointwise`: VNNI/AMX dot products, int32 accumulation) runs it with the bias, GELU and the
    residual add fused, as the fp32 path does; fp32 in, fp32 out. Where oneDNN's brgemm ukernel runs int8 (AMX
    or AVX-512 VNNI), vitkit's `linear_u8s8` (the same arithmetic, the weight packed once, no per-call primitive
    setup: on an Intel Xeon with AMX, ViT-S/16's int8 matmuls at batch 1 took 50-80% of oneDNN's time) runs the
    calls whose size it measured faster at (`_int8_brgemm_faster`, as the bf16 path picks its linear); oneDNN's copy
    of the int8 weight is then packed only when a call first needs it. Where oneDNN's fused op is missing,
    PyTorch's `quantized::linear_dynamic` (fbgemm) runs the matmul and the epilogue runs after it."""

    def __init__(self, weight: torch.Tensor, bias: Optional[torch.Tensor] = None,
                 scale: Optional[torch.Tensor] = None, act: Optional[nn.Module] = None,
                 out_dtype: torch.dtype = torch.float32, out_qparams: Optional[Tuple[float, int]] = None):
        self._source = (weight, bias, scale)
        w, b = _folded(weight, bias, scale)
        w = w.float().contiguous()
        self.out_dtype = out_dtype  # bf16 for a qkv whose output goes to the bf16 attention (fused path only)
        # (scale, zero point): write the output as uint8 over that static range (`_Quantized`, for the next int8
        # linear: fc1 → fc2 with a calibrated range; fused path only)
        self.out_qparams = out_qparams
        self.w_scale, qw = self._quantized(w)
        self.w_zp = torch.zeros(w.shape[0], dtype=torch.long)
        self.bias = b.float().contiguous() if b is not None else None
        self.gelu = act.approximate if isinstance(act, nn.GELU) else None
        self.act = act if self.gelu is None and act is not None and not isinstance(act, nn.Identity) else None
        self.fused = int8_fused_available()
        self.n, self.k = w.shape
        self.s8 = None  # the int8 weight packed for the brgemm ukernel, where it runs this linear
        self._picks: dict = {}  # (rows, add) → whether the brgemm linear runs them
        if self.fused:
            self._weight = None  # oneDNN's prepacked weight (`weight`)
            if brgemm_int8_available(self.n, self.k) and self.gelu in (None, "none"):
                self.mod = kernels.cpu_attention()
                self.s8 = self.mod.pack_linear_s8(qw.contiguous())
                self.colsum = qw.sum(dim=1, dtype=torch.int32).contiguous()
            else:
                self._weight = torch.ops.onednn.qlinear_prepack(qw, None)
        else:  # fbgemm's dynamic linear writes fp32 only
            self.out_qparams = None
            with warnings.catch_warnings(), _quantized_engine(int8_engine()):
                warnings.simplefilter("ignore", UserWarning)
                q = torch._make_per_channel_quantized_tensor(qw, self.w_scale.double(), self.w_zp, 0)
                self.weight = torch.ops.quantized.linear_prepack(q, self.bias)

    @staticmethod
    def _quantized(w: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """fp32 W (N, K) → (per output channel scale, int8 W): symmetric, round to nearest."""
        w_scale = (w.abs().amax(dim=1).clamp(min=1e-12) / 127.0).contiguous()
        return w_scale, torch.round(w / w_scale[:, None]).clamp(-127, 127).to(torch.int8)

    @property
    def weight(self):
        """oneDNN's prepacked int8 weight; beside the brgemm kernel's copy, packed (from the model's weight, the same
        int8 values) only when some call first runs on oneDNN, so that batch-1 use holds one int8 copy."""
        if self._weight is None:
            w, _ = _folded(*self._source)
            self._weight = torch.ops.onednn.qlinear_prepack(self._quantized(w.float().contiguous())[1], None)
        return self._weight

    @weight.setter
    def weight(self, value):
        self._weight = value

    @staticmethod
    def _quantize(x):
        """x → (uint8 values, scale, zero point), from x's own range: PyTorch's dynamic per-tensor quantisation, in
        vitkit's kernel where it is built (two passes over x instead of four). An x already quantised (`_Quantized`,
        from the previous linear) passes through."""
        if isinstance(x, _Quantized):
            return x
        mod = kernels.cpu_attention()
        if mod is not None:
            return mod.quantize_u8(x.float())
        with warnings.catch_warnings():  # PyTorch flags its quantized-tensor API as deprecated; its kernels stay
            warnings.simplefilter("ignore", UserWarning)
            q = torch.quantize_per_tensor_dynamic(x.float().contiguous(), torch.quint8, False)
        return q.int_repr(), q.q_scale(), q.q_zero_point()

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if not self.fused:
            y = torch.ops.quantized.linear_dynamic(x.float(), self.weight, False)
            y = F.gelu(y, approximate=self.gelu) if self.gelu is not None else y
            return self.act(y) if self.act is not None else y
        qx, s, zp = self._quantize(x)
        run = self._brgemm if self._on_brgemm(qx.shape[0], False) else self._onednn
        return run(qx, s, zp, None)

    def add(self, x: torch.Tensor, other: torch.Tensor) -> torch.Tensor:
        """x W^T + b + other (the fp32 residual), the add fused into the matmul where oneDNN runs it."""
        if not self.fused:
            return torch.add(other, self(x))
        qx, s, zp = self._quantize(x)
        run = self._brgemm if self._on_brgemm(qx.shape[0], True) else self._onednn
        return run(qx, s, zp, other.contiguous())

    def _out_kind(self, add: bool) -> int:
        """What a call writes: 0 fp32, 1 bf16 (for the bf16 attention), 2 uint8 over the static output range."""
        if add:
            return 0
        if self.out_qparams is not None and self.act is None:
            return 2
        return 1 if self.out_dtype == torch.bfloat16 else 0

    def _on_brgemm(self, rows: int, add: bool) -> bool:
        pick = self._picks.get((rows, add))
        if pick is None:
            pick = self._picks[(rows, add)] = self.s8 is not None and _brgemm_measured_faster(
                rows, _int8_brgemm_faster, self.k, self.n, self.gelu is not None, add, self._out_kind(add))
        return pick

    def _onednn(self, qx, s, zp, other):
        post, algo = ("gelu", self.gelu) if self.gelu is not None else ("none", "")
        if other is not None:
            return torch.ops.onednn.qlinear_pointwise.binary(qx, s, zp, self.weight, self.w_scale, self.w_zp, other,
                                                             self.bias, 1.0, 0, torch.float32, 1.0, 0, "add", 1.0,
                                                             "none", [], "")
        if self._out_kind(False) == 2:
            o_s, o_zp = self.out_qparams
            y = torch.ops.onednn.qlinear_pointwise(qx, s, zp, self.weight, self.w_scale, self.w_zp, self.bias, o_s,
                                                   o_zp, torch.uint8, post, [], algo)
            return _Quantized(y, o_s, o_zp)
        y = torch.ops.onednn.qlinear_pointwise(qx, s, zp, self.weight, self.w_scale, self.w_zp, self.bias, 1.0, 0,
                                               self.out_dtype, post, [], algo)
        return self.act(y) if self.act is not None else y

    def _brgemm(self, qx, s, zp, other):
        kind = self._out_kind(other is not None)
        o_s, o_zp = self.out_qparams if kind == 2 else (1.0, 0)
        y = self.mod.linear_u8s8(qx, s, zp, self.s8, self.w_scale, self.colsum, self.bias,
                                 self.gelu is not None and other is None, other, kind, o_s, o_zp)
        if kind == 2:
            return _Quantized(y, o_s, o_zp)
        return self.act(y) if self.act is not None and other is None else y


def brgemm_int8_available(n: int, k: int) -> bool:
    """Whether vitkit's int8 brgemm linear runs a (k → n) linear here: the kernel is built, oneDNN's brgemm ukernel
    runs uint8 x int8 on this CPU (AMX or AVX-512 VNNI), n is a multiple of 64 and k of 4, and VITKIT_NO_BRGEMM is
    not set."""
    mod = kernels.cpu_attention()
    return (mod is not None and n % 64 == 0 and k % 4 == 0 and kernels.brgemm_allowed() and
            bool(mod.int8_linear_available()))


@functools.lru_cache(maxsize=None)
def _int8_brgemm_faster(rows: int, k: int, n: int, gelu: bool, add: bool, out_kind: int) -> bool:
    """Whether the int8 brgemm linear beats oneDNN's int8 matmul for a (rows x k) input to n outputs here (with GELU /
    the residual add / the output kind as given; the input's quantisation is the same for both and not timed):
    interleaved, medians of 5; a few ms, once per process."""
    g = torch.Generator().manual_seed(0)
    w, x = torch.randn(n, k, generator=g) * 0.05, torch.randn(rows, k, generator=g)
    lin = _Int8Linear(w, torch.zeros(n), act=nn.GELU() if gelu else None,
                      out_dtype=torch.bfloat16 if out_kind == 1 else torch.float32,
                      out_qparams=(0.05, 10) if out_kind == 2 else None)
    qx, s, zp = lin._quantize(x)
    other = torch.randn(rows, n, generator=g) if add else None
    runs = {"oneDNN": functools.partial(lin._onednn, qx, s, zp, other),
            "brgemm": functools.partial(lin._brgemm, qx, s, zp, other)}
    return _brgemm_wins(runs, f"int8 linear {rows}x{k}x{n}", gelu, add)


class _Quantized(NamedTuple):
    """An activation already in uint8 (values, scale, zero point): an int8 linear's output for the next one."""
    values: torch.Tensor
    scale: float
    zero_point: int


def int8_fused_available() -> bool:
    """Whether this build has oneDNN's int8 matmul with fused epilogues (x86 PyTorch builds do)."""
    return hasattr(torch.ops.onednn, "qlinear_pointwise") and hasattr(torch.ops.onednn, "qlinear_prepack")


def _folded(weight, bias, scale):
    """(W, b) detached, with a following per-channel scale (LayerScale) folded in."""
    w = weight.detach()
    b = bias.detach() if bias is not None else None
    if scale is not None:
        w = w * scale.detach()[:, None]
        b = b * scale.detach() if b is not None else None
    return w, b


def int8_engine() -> Optional[str]:
    """The quantised engine for int8 linears here: oneDNN where the build has it (VNNI/AMX), else x86/fbgemm."""
    engines = torch.backends.quantized.supported_engines
    return next((e for e in ("onednn", "x86", "fbgemm") if e in engines), None)


class _quantized_engine:
    """Set torch.backends.quantized.engine for a block (prepacking picks its kernels from it), then restore it."""

    def __init__(self, engine):
        self.engine = engine

    def __enter__(self):
        self.old = torch.backends.quantized.engine
        torch.backends.quantized.engine = self.engine

    def __exit__(self, *exc):
        torch.backends.quantized.engine = self.old


def _linear(weight, bias=None, scale=None, act=None, precision: str = "fp32", int8_out=torch.float32,
            out_qparams=None):
    """The packed linear of a precision ("fp32", "bf16", "int8"); int8_out: an int8 linear's output dtype;
    out_qparams: its static uint8 output range (see `_Int8Linear`)."""
    if precision == "int8":
        return _Int8Linear(weight, bias, scale=scale, act=act, out_dtype=int8_out, out_qparams=out_qparams)
    if precision == "bf16" and brgemm_linear_available(*weight.shape):
        return _Bf16Linear(weight, bias, scale=scale, act=act)
    return _PackedLinear(weight, bias, scale=scale, act=act,
                         dtype=torch.bfloat16 if precision == "bf16" else torch.float32)


def kept_precision(device: torch.device, rows: int, k: int, n: int) -> str:
    """The precision of a linear that calibration keeps out of int8: bf16 where this CPU runs it natively and a
    (rows x k) @ (k x n) bf16 matmul measured faster than fp32 (`_bf16_linear_faster`), else fp32 (exact, and
    faster there: an Intel Xeon without AMX runs bf16 matmuls at ~0.55x of fp32, an AMD EPYC at ~2x)."""
    return "bf16" if bf16_native(device) and _bf16_linear_faster(int(rows), int(k), int(n)) else "fp32"


def kept_precision_for(model: nn.Module) -> str:
    """`kept_precision` measured at a ViT's own fc2 (the linear calibration keeps most often: massive activations)
    on four images' tokens."""
    fc2 = model.blocks[0].mlp.fc2
    return kept_precision(next(model.parameters()).device, 4 * own_tokens(model), fc2.in_features, fc2.out_features)


def own_tokens(model: nn.Module) -> int:
    """The sequence length of a ViT at its own image size: the patches and the prefix tokens."""
    return model.patch_embed.num_patches + model.num_prefix_tokens


@functools.lru_cache(maxsize=None)
def _bf16_linear_faster(rows: int, k: int, n: int) -> bool:
    """Whether the prepacked bf16 linear beats the fp32 one at this shape here: measured once per process and shape
    (interleaved, medians of 5; tens of ms)."""
    g = torch.Generator().manual_seed(0)
    w, x = torch.randn(n, k, generator=g), torch.randn(rows, k, generator=g)
    try:
        lins = {"fp32": _PackedLinear(w), "bf16": _PackedLinear(w, dtype=torch.bfloat16)}
    except (RuntimeError, NotImplementedError):
        return False
    with torch.inference_mode():
        med = medians_in_turns({p: functools.partial(lin, x) for p, lin in lins.items()}, reps=5, warmup=1)
    log.info("linears kept out of int8: fp32 %.2f ms, bf16 %.2f ms at %dx%dx%d; %s", 1e3 * med["fp32"],
             1e3 * med["bf16"], rows, k, n, "bf16" if med["bf16"] < med["fp32"] else "fp32")
    return med["bf16"] < med["fp32"]


class _LayerNorm:
    """A block's nn.LayerNorm on vitkit's kernel (`layer_norm`), for the bf16 and int8 paths: in bf16 where the
    linear after it reads bf16 (no separate rounding pass: on an Intel Xeon with AMX, LayerNorm + qkv at ViT-S/16
    batch 1 206 → 166 µs), else in fp32."""

    def __init__(self, norm: nn.LayerNorm, kernel, out_bf16: bool):
        self.mod, self.out_bf16, self.eps = kernel, out_bf16, norm.eps
        self.weight = norm.weight.detach().float().contiguous() if norm.weight is not None else None
        self.bias = norm.bias.detach().float().contiguous() if norm.bias is not None else None

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return self.mod.layer_norm(x, self.weight, self.bias, self.eps, self.out_bf16)


def _norm(norm: nn.Module, kernel, precision: str) -> nn.Module:
    """The norm before a linear of this precision: the module itself in fp32 (unchanged numerics), where the kernel
    is off, or for anything but a plain LayerNorm over the last dimension; else `_LayerNorm`."""
    if precision == "fp32" or kernel is None or type(norm) is not nn.LayerNorm or len(norm.normalized_shape) != 1:
        return norm
    return _LayerNorm(norm, kernel, precision == "bf16")


def _layer_scale(ls: nn.Module) -> Optional[torch.Tensor]:
    return ls.gamma if isinstance(ls, LayerScale) else None


# the bf16 and int8 blocks run as one kernel call where they can (`_PackedBlock._whole`); False: step by step
WHOLE_BLOCK = True


class _PackedBlock:
    """A pre-norm ViT block (`vit.Block`) on prepacked weights, with ToMe's merging and a prefix-only mode."""

    def __init__(self, blk: Block, kernel=None, precision: str = "fp32", layers: Optional[dict] = None,
                 tokens: int = 197, fc2_range: Optional[Tuple[float, float]] = None):
        """layers: per linear ("qkv", "proj", "fc1", "fc2") the precision it runs in where `precision` is "int8"
        (a calibrated `Int8Plan` keeps some in bf16/fp32); all int8 without it. tokens: the sequence length at the
        model's own image size (which attention kernel is faster is measured there). fc2_range: fc2's calibrated
        static input range: an int8 fc1 then writes uint8 for an int8 fc2 (`vitkit.models.quantize`)."""
        attn = blk.attn
        self.precision = precision
        kind = {k: (layers or {}).get(k, precision) if precision == "int8" else precision
                for k in ("qkv", "proj", "fc1", "fc2")}
        self.layers = kind
        # vitkit's attention kernel (kernels.py) reads q, k, v in place from the qkv output: not with q/k norms
        self.kernel = kernel if isinstance(attn.q_norm, nn.Identity) and isinstance(attn.k_norm, nn.Identity) else None
        # which attention a bf16 or int8 qkv output goes to is measured at the model's token count
        # (`kernels.reduced_attention`: vitkit's fp32 or bf16 kernel, or PyTorch's bf16 flash attention); with a bf16
        # one, the qkv matmul writes bf16 (an int8 one straight from its matmul)
        reduced = kind["qkv"] == "bf16" or (kind["qkv"] == "int8" and int8_fused_available())
        self.attention = (kernels.reduced_attention(tokens, attn.num_heads, attn.head_dim)
                          if self.kernel is not None and reduced else "fp32")
        self.attention_out_bf16 = kind["proj"] == "bf16"  # the projection casts its input to bf16 anyway
        self.norm1, self.norm2 = _norm(blk.norm1, kernel, kind["qkv"]), _norm(blk.norm2, kernel, kind["fc1"])
        self.q_norm, self.k_norm = attn.q_norm, attn.k_norm
        self.num_heads, self.head_dim = attn.num_heads, attn.head_dim
        self.attend = attn.attend  # the eager attention (fused kernels, proportional attention's size bias)
        self.qkv = _linear(attn.qkv.weight, attn.qkv.bias, precision=kind["qkv"],
                           int8_out=torch.bfloat16 if self.bf16_attention else torch.float32)
        self._qkv_linear, self._q_kv = attn.qkv, None  # (q, kv) split, made when a prefix-only call needs it
        self.proj = _linear(attn.proj.weight, attn.proj.bias, scale=_layer_scale(blk.ls1), precision=kind["proj"])
        static = fc2_range is not None and kind["fc1"] == kind["fc2"] == "int8" and isinstance(blk.mlp.act, nn.GELU)
        self.fc1 = _linear(blk.mlp.fc1.weight, blk.mlp.fc1.bias, act=blk.mlp.act, precision=kind["fc1"],
                           out_qparams=static_qparams(*fc2_range) if static else None)
        self.fc2 = _linear(blk.mlp.fc2.weight, blk.mlp.fc2.bias, scale=_layer_scale(blk.ls2), precision=kind["fc2"])
        self._wholes: dict = {}  # rows → whether the block runs as one kernel call (`_whole`)
        self._cpp: tuple = ()    # its linears for `block_forward`

    @property
    def bf16_attention(self) -> bool:
        """Whether attention reads a bf16 qkv output (vitkit's bf16 kernel, on its tiles or the brgemm ukernel, or
        PyTorch's bf16 flash attention)."""
        return self.attention != "fp32"

    def _whole(self, rows: int, tokens: int) -> bool:
        """Whether the whole block runs as one kernel call (`block_forward`: the same kernel calls as the step-by-step
        path below, without the Python between them): with the bf16 attention, the kernel's LayerNorms and every
        linear on the brgemm ukernel (bf16 or int8). Where the step-by-step path runs each linear on brgemm at this
        row count anyway, always; where it picked oneDNN for some, whichever of the two measured faster here
        (`_whole_faster`). Asked once per row count."""
        whole = self._wholes.get(rows)
        if whole is None:
            whole = self._wholes[rows] = self._whole_fits(rows, tokens)
        return whole

    def _whole_fits(self, rows: int, tokens: int) -> bool:
        if (not WHOLE_BLOCK or self.kernel is None or tokens > kernels.MAX_TOKENS or rows > BRGEMM_MAX_ROWS or
                self.attention not in ("bf16", "bf16-brgemm") or
                not isinstance(self.norm1, _LayerNorm) or not isinstance(self.norm2, _LayerNorm) or
                not hasattr(self.kernel, "block_forward")):
            return False
        bf16 = torch.bfloat16
        # each linear's input dtype (bf16 linears) as the step-by-step path feeds them
        fc2_in = bf16 if self.layers["fc1"] == "bf16" else torch.float32
        steps = ((self.qkv, False, bf16), (self.proj, True, bf16), (self.fc1, False, bf16), (self.fc2, True, fc2_in))
        cpp, same = [], True
        for lin, add, dtype in steps:
            if isinstance(lin, _Bf16Linear) and lin.brgemm.act is None:
                b = lin.brgemm
                cpp.append(self.kernel.BlockLinear(False, b.weight, b.bias, None, None, b.gelu, 1))
                same = same and lin.pick(rows, add, dtype) is b
            elif isinstance(lin, _Int8Linear) and lin.s8 is not None and lin.act is None:
                kind = lin._out_kind(False)
                o_s, o_zp = lin.out_qparams if kind == 2 else (1.0, 0)
                cpp.append(self.kernel.BlockLinear(True, lin.s8, lin.bias, lin.w_scale, lin.colsum,
                                                   lin.gelu is not None, kind, o_s, o_zp))
                same = same and lin._on_brgemm(rows, add)
            else:
                return False
        self._cpp = tuple(cpp)
        return same or self._whole_faster(rows, tokens)

    def _whole_faster(self, rows: int, tokens: int) -> bool:
        """Whether the block in one call (every linear on brgemm) beats the step-by-step path with its own picks
        (oneDNN for some linears) on a (rows / tokens, tokens) input: interleaved, medians of 5, logged."""
        x = torch.randn(rows // tokens, tokens, self.num_heads * self.head_dim,
                        generator=torch.Generator().manual_seed(0))
        self._wholes[rows] = False
        with torch.inference_mode():
            med = medians_in_turns({"steps": functools.partial(self, x), "whole": functools.partial(self._one_call, x)},
                                   reps=5, warmup=1)
        won = med["whole"] < med["steps"]
        log.info("block at %d rows: step by step (some linears on oneDNN) %.3f ms, in one call (all on brgemm) "
                 "%.3f ms; %s", rows, 1e3 * med["steps"], 1e3 * med["whole"], "one call" if won else "step by step")
        return won

    def _one_call(self, x: torch.Tensor) -> torch.Tensor:
        """The block on x (B, N, C) as one kernel call (`block_forward`, with the linears `_whole_fits` set up)."""
        return self.kernel.block_forward(x, self.norm1.weight, self.norm1.bias, self.norm1.eps, self.norm2.weight,
                                         self.norm2.bias, self.norm2.eps, *self._cpp, self.num_heads,
                                         self.attention == "bf16-brgemm")

    def _split_qkv(self) -> Tuple[_PackedLinear, _PackedLinear]:
        if self._q_kv is None:
            w, b = self._qkv_linear.weight, self._qkv_linear.bias
            rows = (slice(0, w.shape[1]), slice(w.shape[1], None))  # q, then k and v
            self._q_kv = tuple(_linear(w[r], b[r] if b is not None else None, precision=self.layers["qkv"])
                               for r in rows)
        return self._q_kv

    def __call__(self, x: torch.Tensor, size: Optional[torch.Tensor] = None, r: int = 0, num_protected: int = 1,
                 keep: Optional[int] = None) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
        """x (B, N, D) → (B, N', D) and the token sizes. size/r: ToMe's proportional attention and merging (as
        `Block.forward_merging`). keep=k: outputs for the first k tokens only (they still attend to every token)."""
        B, N, C = x.shape
        H, hd = self.num_heads, self.head_dim
        if keep is None and r == 0 and size is None and self._whole(B * N, N):
            return self._one_call(x.contiguous()), None
        h = self.norm1(x.reshape(B * N, C))
        # with a prefix-only output (keep) a bf16 qkv's bf16 attention takes the kept queries from the whole qkv
        # output (the extra query rows cost little in bf16). fp32 and int8 split the matmul instead: in int8 the
        # kept queries quantised with their own range and attended in fp32 keep ImageNet ViT-Ti/16's calibrated
        # top-1 at 82.52%, the whole-qkv way gave 82.35%
        kernel_keep = keep is None or (self.attention in ("bf16", "bf16-brgemm") and self.layers["qkv"] == "bf16")
        if kernel_keep and self.kernel is not None and N <= kernels.MAX_TOKENS:
            nq = N if keep is None else keep
            qkv = self.qkv(h).view(B, N, 3, H, hd)
            bias = size_bias(size, torch.float32)
            bias = bias.view(B, N) if bias is not None else None
            if self.attention == "sdpa-bf16":  # (B, N, H, hd) in bf16
                o = kernels.sdpa_from_qkv(qkv, bias)
            elif self.attention in ("bf16", "bf16-brgemm"):  # (B, nq, H, hd), bf16 where the projection reads bf16
                o = self.kernel.attention_bf16(qkv, nq, bias, self.attention_out_bf16,
                                               self.attention == "bf16-brgemm")
            else:  # the fp32 kernel (a no-op cast in fp32 and int8)
                qkv = qkv.float()
                o = self.kernel.attention(qkv, N, bias)
            # the keys, averaged over heads (ToMe's merging: not in a prefix-only block)
            metric = qkv[:, :, 1].float().mean(dim=2) if r > 0 and keep is None else None
            res = (x if keep is None else x[:, :keep]).reshape(B * nq, C)
            return self._mlp(self.proj.add(o.reshape(B * nq, C), res), B, nq, C, size, metric, r, num_protected)
        if keep is None:
            q, k, v = self.qkv(h).float().view(B, N, 3, H, hd).permute(2, 0, 3, 1, 4).unbind(0)
        else:  # keys and values for every token, queries for the kept ones only
            q_lin, kv_lin = self._split_qkv()
            k, v = kv_lin(h).float().view(B, N, 2, H, hd).permute(2, 0, 3, 1, 4).unbind(0)
            q = q_lin(h.view(B, N, C)[:, :keep].reshape(B * keep, C)).float().view(B, keep, H, hd).transpose(1, 2)
        q, k = self.q_norm(q), self.k_norm(k)
        metric = k.mean(dim=1) if r > 0 and keep is None else None
        if keep is not None:
            x, N = x[:, :keep], keep
        o, _ = self.attend(q, k, v, size_bias(size, q.dtype))  # (B, H, N, hd), laid out as (B, N, H, hd)
        x = self.proj.add(o.transpose(1, 2).reshape(B * N, C), x.reshape(B * N, C))
        return self._mlp(x, B, N, C, size, metric, r, num_protected)

    def _mlp(self, x, B, N, C, size, metric, r, num_protected):
        """(ToMe's merge, then) x + MLP(LN(x)) on the (B * N, C) residual stream."""
        if metric is not None:
            x, size = merge_tokens(x.view(B, N, C), size, metric, r, num_protected)
            N = x.shape[1]
            x = x.reshape(B * N, C)
        x = self.fc2.add(self.fc1(self.norm2(x)), x)
        return x.view(B, N, C), size


class _PatchLinear:
    """The patch embedding's convolution (kernel = stride = patch size) as one bf16 matmul over the image's
    patches, gathered by a strided view and one copy (im2col). oneDNN runs that convolution in fp32 only, and slowly
    at these shapes. The weight is split into two bf16 terms, W = W_hi + W_lo (16 significant bits), and each patch
    is multiplied by both ([x, x] [W_hi; W_lo]): a bf16 weight alone cost ViT-Ti/16 0.2 points of ImageNet top-1,
    the pixels' own bf16 rounding nothing measurable. On vitkit's brgemm linear the tokens come out in fp32. On an
    Intel Xeon with AMX, ViT-S/16: 0.69 → ~0.3 ms at batch 1."""

    def __init__(self, pe: PatchEmbed):
        conv = pe.proj
        self.patch = pe.patch_size
        w = conv.weight.detach().reshape(conv.out_channels, -1).float()
        hi = w.bfloat16().float()
        w2 = torch.cat([hi, w - hi], dim=1)
        self.bias = conv.bias.detach().float().contiguous() if conv.bias is not None else None
        self.mod = kernels.cpu_attention() if brgemm_linear_available(*w2.shape) else None
        if self.mod is not None:
            self.weight = self.mod.pack_linear_bf16(w2)
        else:  # oneDNN's bf16 matmul, whose output is bf16
            self.linear = _PackedLinear(w2, self.bias, dtype=torch.bfloat16)

    @staticmethod
    def fits(pe: PatchEmbed) -> bool:
        """Whether a patch embedding is this plain convolution (no conv stem, no padding of odd image sizes)."""
        conv = pe.proj
        return (pe.backbone is None and not pe.dynamic_img_pad and conv.groups == 1 and
                tuple(conv.kernel_size) == tuple(conv.stride) == tuple(pe.patch_size) and
                tuple(conv.padding) == (0, 0) and tuple(conv.dilation) == (1, 1))

    def __call__(self, x: torch.Tensor, pos: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Images (B, C, H, W), H and W multiples of the patch size → patch tokens (B, H/p, W/p, D) in fp32;
        pos: a (H/p W/p, D) fp32 position embedding added to each image's tokens (in the matmul's epilogue on
        vitkit's kernel)."""
        B, C, H, W = x.shape
        ph, pw = self.patch
        if self.mod is not None:  # im2col and [x, x] for [W_hi; W_lo] in one pass
            y = self.mod.linear_bf16(self.mod.patch_cols(x, ph, pw), self.weight, self.bias, False, pos, False)
        else:
            cols = x.reshape(B, C, H // ph, ph, W // pw, pw).permute(0, 2, 4, 1, 3, 5).to(torch.bfloat16)
            y = self.linear(cols.reshape(-1, C * ph * pw).repeat(1, 2)).float()
            y = y if pos is None else (y.view(B, -1, y.shape[-1]) + pos).view(-1, y.shape[-1])
        return y.view(B, H // ph, W // pw, -1)

    def tokens(self, x: torch.Tensor, m: VisionTransformer) -> torch.Tensor:
        """Images → m's first block input, as `m.embed` computes it with this patch embedding: the prefix (class,
        register) tokens, then the patch tokens, each plus its position embedding."""
        ph, pw = self.patch
        grid = (x.shape[2] // ph, x.shape[3] // pw)
        if m.no_embed_class:
            return m.norm_pre(m.patch_drop(m._pos_embed(self(x))))
        p = m.num_prefix_tokens
        pos = resample_abs_pos_embed(m.pos_embed, grid, m.patch_embed.grid_size, p)[0]  # (p + patches, D)
        y = self(x, pos[p:].contiguous()).flatten(1, 2)
        prefix = [t for t in (m.cls_token, m.reg_token) if t is not None]
        if prefix:
            y = torch.cat([(torch.cat(prefix, dim=1) + pos[:p]).expand(x.shape[0], -1, -1), y], dim=1)
        return m.norm_pre(m.patch_drop(m.pos_drop(y)))


# the models whose forward is embed → blocks → norm → forward_head (the distilled head reads two prefix tokens)
_ONEDNN_MODELS: Tuple[type, ...] = (VisionTransformer, VisionTransformerDistilled)


class OptimizedViT(nn.Module):
    """An inference-only wrapper: `forward(x)` → logits, `forward_features(x)` → tokens, `forward_head(t, pre_logits)`,
    `embed_images(x)` → pooled pre-logit features (B, D). The wrapped model is `.model` (a private copy);
    `.backend` says which path runs."""

    def __init__(self, model: VisionTransformer, backend: str = "auto", pad_batches: bool = True,
                 attention_kernel: bool = True, precision: str = "fp32"):
        super().__init__()
        if backend not in BACKENDS:
            raise ConfigError(f"backend must be one of {', '.join(BACKENDS)}, got {backend!r}")
        if precision not in PRECISIONS:
            raise ConfigError(f"precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
        self.model = model.eval().requires_grad_(False)
        if backend in ("auto", "onednn"):
            ok, why = onednn_supported(model)
            if backend == "onednn" and not ok:
                raise ConfigError(f"the onednn backend cannot run here: {why}; use backend='auto'")
            backend = "onednn" if ok else "compile"
        self.backend = backend
        self.pad_batches = pad_batches
        self._fns = {}
        self._sizes = {}  # method name → batch sizes compiled so far
        self._kernel = kernels.cpu_attention() if backend == "onednn" and attention_kernel else None
        self.attention = "vitkit" if self._kernel is not None else "sdpa"  # the oneDNN path's attention kernel
        device = next(model.parameters()).device
        self.choice: Optional[Choice] = None  # what precision="auto" measured and picked (after the first call)
        self._auto: Optional[Tuple[str, ...]] = None  # the candidates still to measure, at the first call
        if precision == "auto":
            found = candidates(device, backend)
            self._auto = found if len(found) > 1 else None
            precision = "fp32"
        elif (why := unavailable(precision, device, backend)) is not None:
            log.warning("precision %s is not available here (%s); running fp32", precision, why)
            precision = "fp32"
        self._packed: dict = {}  # precision → the oneDNN path's packed blocks
        self._patch: dict = {}  # precision → its bf16 patch embedding (`_PatchLinear`), or None: the model's conv
        self.int8_plan: Optional[Int8Plan] = None  # set by calibrate_int8: smoothing and per-linear precisions
        self._calibrate_first = False  # int8: calibrate on the first batch (optimize(calibration="first"))
        self._unsmoothed: Optional[dict] = None  # auto: the weights before its int8 candidate's smoothing
        self._set_precision(precision)
        self.training = False

    def _set_precision(self, precision: str) -> None:
        self.precision = precision
        if self.backend == "onednn":
            if precision not in self._packed:
                depth = len(self.model.blocks)
                plan = self.int8_plan.layers if self.int8_plan is not None else [None] * depth
                ranges = (self.int8_plan.fc2_ranges if self.int8_plan is not None and precision == "int8" else None
                          ) or [None] * depth
                tokens = own_tokens(self.model)
                self._packed[precision] = [_PackedBlock(b, self._kernel, precision, layers, tokens, rng)
                                           for b, layers, rng in zip(self.model.blocks, plan, ranges)]
                self._patch[precision] = self._patch_linear(precision)
            self._blocks: List[_PackedBlock] = self._packed[precision]
        else:
            self._blocks = []
        self._fns, self._sizes = {}, {}

    def _patch_linear(self, precision: str) -> Optional[_PatchLinear]:
        """The bf16 patch embedding for the bf16 path, and for int8 where a bf16 matmul of its shape measured faster
        than fp32 here (`kept_precision`: the image's pixels are not quantised to int8); None: the model's fp32
        convolution (fp32, or a CPU without fast bf16)."""
        pe, device = self.model.patch_embed, next(self.model.parameters()).device
        if precision == "fp32" or not _PatchLinear.fits(pe) or not bf16_native(device):
            return None
        conv = pe.proj
        k = 2 * conv.weight[0].numel()  # the two bf16 terms of the weight (`_PatchLinear`)
        if precision == "int8" and kept_precision(device, pe.num_patches, k, conv.out_channels) != "bf16":
            return None
        return _PatchLinear(pe)

    def calibrate_int8(self, images: torch.Tensor) -> Int8Plan:
        """Calibrate the int8 path on `images` (B, C, H, W), preprocessed: fold SmoothQuant's factors into this
        wrapper's copy of the model (exact in fp32) and keep the linears whose measured int8 error is too large in
        bf16 or fp32, whichever is faster here (`kept_precision`); see `vitkit.models.quantize`. Repacks the
        weights. As auto's int8 candidate, the weights from before the smoothing are kept until auto has picked."""
        if self._auto is not None and self._unsmoothed is None:
            self._unsmoothed = {k: v.clone() for k, v in self.model.state_dict().items()}
        self.use_int8_plan(calibrate(self.model, images, fallback=kept_precision_for(self.model)))
        release_heap()  # the calibration passes' activations
        log.info("vitkit.optimize: %s", self.int8_plan.summary())
        return self.int8_plan

    def use_int8_plan(self, plan: Int8Plan) -> None:
        """Run int8 with these per-linear precisions (`plan.layers`; e.g. edited to keep more linears out of int8)
        and repack. The smoothing is not applied here: `calibrate_int8` folds it into the model."""
        if len(plan.layers) != len(self.model.blocks) or (plan.fc2_ranges is not None and
                                                          len(plan.fc2_ranges) != len(self.model.blocks)):
            raise ConfigError(f"the int8 plan has {len(plan.layers)} blocks, the model {len(self.model.blocks)}; "
                              "calibrate this model (calibration=images) instead of reusing another's plan")
        self.int8_plan = plan
        self._packed = {}
        self._set_precision(self.precision)

    def _decide(self, name: str, fn, x: torch.Tensor) -> None:
        """precision="auto", at the first call: measure the candidates on this batch, keep the fastest that agrees
        with fp32 (`vitkit.models.precision`), drop the others' packed weights."""
        names = self._auto
        cfg = getattr(self.model, "config", None)
        digest = hashlib.sha1(repr(cfg).encode()).hexdigest()[:12]
        sig = (f"{type(self.model).__name__} {digest} {tuple(x.shape[1:])} {self.backend} {name} "
               f"tome {self.model.tome_r or 0}")
        key = shape_key(sig, x.shape[0], x.device)

        if "int8" in names and self.int8_plan is None:  # no calibration images given: the first batch is
            self.calibrate_int8(x)
        self._auto = None  # from here on, the candidates' runs below are plain calls

        def run(p: str) -> torch.Tensor:
            self._set_precision(p)
            return self._run(name, fn, x, measuring=True)
        self.choice = choose(run, names, key, logits=name == "forward", batch=x.shape[0])
        if self.choice.precision != "int8" and self._unsmoothed is not None:
            # the int8 candidate's smoothing is exact in fp32 but moves bf16's roundings: the pick runs on the
            # model's own weights, as optimize(precision=<pick>) would (ImageNet ViT-Ti/16 bf16: 82.57 → 82.74%)
            self.model.load_state_dict(self._unsmoothed)
            self.int8_plan = None
        self._unsmoothed = None
        self._packed = {}
        self._set_precision(self.choice.precision)
        log.info("vitkit.optimize: %s", self.choice.summary())

    def _apply(self, fn, *args, **kwargs):
        if self.backend == "onednn":  # the prepacked weights are CPU float32 copies: they cannot follow
            raise RuntimeError("a model optimized for the CPU (backend 'onednn') cannot be moved or cast; move or "
                               "cast the model first, then call vitkit.optimize on it")
        return super()._apply(fn, *args, **kwargs)

    @property
    def compiled(self) -> bool:
        return self.backend == "compile"

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

    # ---- the oneDNN path ----
    def _tokens(self, x: torch.Tensor, prefix_only: bool) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
        """Images → tokens after the final norm and their ToMe sizes; prefix_only: the last block outputs the
        prefix (class, register, distillation) tokens only."""
        m = self.model
        patch = self._patch.get(self.precision)
        if patch is None:
            x = m.embed(x)
        else:  # as m.embed, with the bf16 patch embedding
            m.patch_embed.check_input(x)
            x = patch.tokens(x, m)
        rs = parse_r(len(self._blocks), m.tome_r or 0)
        size, last = None, len(self._blocks) - 1
        for i, (blk, r) in enumerate(zip(self._blocks, rs)):
            keep = m.num_prefix_tokens if prefix_only and i == last else None
            x, size = blk(x, size, r, m.num_prefix_tokens, keep)
        return m.norm(x), size

    def _onednn(self, name: str, x: torch.Tensor) -> torch.Tensor:
        prefix_only = name != "forward_features" and self.model.global_pool == "token"
        with torch.inference_mode():
            x, size = self._tokens(x, prefix_only)
            return x if name == "forward_features" else self.model.forward_head(x, name == "embed_images", size=size)

    # ---- torch.compile / eager ----
    def _run(self, name: str, fn, x: torch.Tensor, measuring: bool = False) -> torch.Tensor:
        if self._auto is not None:
            self._decide(name, fn, x)
        if self._calibrate_first:  # int8 with calibration="first": calibrated on this batch, as auto's candidate is
            self._calibrate_first = False
            if self.int8_plan is None:
                self.calibrate_int8(x)
        if self.backend == "onednn":
            return self._onednn(name, x)
        fn = self._in_precision(fn)
        if self.backend == "eager" or measuring:  # auto measures the compile backend's candidates eagerly
            with torch.inference_mode():
                return fn(x)
        if name not in self._fns:
            self._fns[name] = compile_frozen(fn, cuda_graphs=x.device.type == "cuda")
            self._sizes[name] = set()
        b = x.shape[0]
        sizes = self._sizes[name]
        pad_to = min((s for s in sizes if s > b), default=None) if self.pad_batches and b not in sizes else None
        if pad_to is not None:
            x = torch.cat([x, x.new_zeros((pad_to - b,) + x.shape[1:])])
        try:
            out = self._fns[name](x)
        except Exception as e:  # noqa: BLE001 - any backend failure: fall back to the plain model, loudly
            log.warning("torch.compile failed (%s: %s); running the model eagerly", type(e).__name__, e)
            self.backend = "eager"
            return self._run(name, fn, x[:b])
        sizes.add(x.shape[0])
        return out[:b] if pad_to is not None else out

    def _in_precision(self, fn):
        """`fn` under bf16 autocast (fp32 outputs) when this precision is bf16 off the oneDNN path."""
        if self.precision != "bf16":
            return fn
        device = next(self.model.parameters()).device.type

        def run(x):
            with torch.autocast(device, dtype=torch.bfloat16):
                return fn(x).float()
        return run

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
        x, size = self.model.forward_features_sizes(x)  # merged tokens weigh their sizes in average pooling
        return self.model.forward_head(x, pre_logits=True, size=size)

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        with torch.inference_mode():
            return self.model.forward_head(x, pre_logits=pre_logits)


def precision_record(model) -> dict:
    """What a report or manifest records of the precision a (possibly optimized) model ran in: {"precision": ...},
    where `auto` chose it {"precision_choice": what it measured}, and for int8 {"precision_int8": its plan}. Every
    key starts with "precision", so a reader can set the whole record aside to compare the rest of a model's identity."""
    out = {"precision": getattr(model, "precision", "fp32") if isinstance(model, OptimizedViT) else "fp32"}
    if isinstance(model, OptimizedViT) and model.choice is not None:
        out["precision_choice"] = model.choice.to_dict()
    if out["precision"] == "int8" and model.int8_plan is not None:
        out["precision_int8"] = model.int8_plan.to_dict()
    return out


def compile_frozen(fn, cuda_graphs: bool = False):
    """`fn` (images → outputs) under torch.compile with inductor freezing, run in inference mode. Freezing must be
    on while Dynamo traces (at the first call): `options={"freezing": True}` reaches only inductor, which by then
    sees the weights as graph inputs and freezes nothing. cuda_graphs (a GPU model): inductor's "reduce-overhead"
    mode replays each batch size's kernels as one CUDA graph, so batch-1 inference is not bound by kernel launches;
    each call starts a new graph step and its outputs are copied out of the graph's memory pool, which the next
    replay overwrites."""
    import torch._inductor.config as inductor_config

    compiled = torch.compile(fn, dynamic=False, mode="reduce-overhead" if cuda_graphs else None)

    def run(x: torch.Tensor) -> torch.Tensor:
        with torch.inference_mode(), inductor_config.patch(freezing=True):
            if not cuda_graphs:
                return compiled(x)
            torch.compiler.cudagraph_mark_step_begin()
            return compiled(x).clone()
    return run


def optimize(
    model: VisionTransformer,
    tome_r: Union[int, Sequence[int]] = 0,
    backend: str = "auto",
    pad_batches: bool = True,
    tune_allocator: bool = True,
    attention_kernel: bool = True,
    precision: str = "fp32",
    calibration: Union[torch.Tensor, str, None] = None,
) -> OptimizedViT:
    """The fastest inference version of `model` (left untouched: the result holds a copy).
    backend: "auto" (oneDNN on an fp32 CPU model where available, else torch.compile), "onednn", "compile" or
    "eager" (see the module docstring). tome_r > 0 merges that many tokens per block (ToMe; faster, slightly less
    accurate); tome_r=0 keeps the exact outputs (≤1e-4 from eager, ~1e-6 in practice). tune_allocator: keep
    activation memory in the heap on CPU (see `tune_malloc()`). attention_kernel: on the oneDNN path, vitkit's own
    attention kernel for sequences up to 1,024 tokens (`kernels.py`; built on first use, ~30 s once).
    precision: "fp32" (default: exact), "bf16" (bf16 matmuls, fp32 accumulation, norms, softmax and residual
    stream), "int8" (int8 linears, dynamic per-tensor activations, per-channel weights; oneDNN path only), or
    "auto": measure the candidates on the first batch (or `calibration`) and keep the fastest whose outputs agree
    with fp32 within `vitkit.models.precision.TOLERANCES`; `.choice` says what it measured. A precision this machine
    cannot run falls back to fp32 with a one-line warning.
    calibration: a batch of real images (B, C, H, W), preprocessed as the model expects (a few hundred is plenty):
    int8 (and auto's int8 candidate) is calibrated on it (`vitkit.models.quantize`: SmoothQuant folded into the
    weights, linears with a large measured int8 error kept in bf16 or fp32, whichever is faster here; from 32
    images on, fc2's input range fixed so that fc1 writes uint8 for it; `.int8_plan` says which). Without it,
    "int8" quantises every linear as it is and "auto" calibrates on its first batch; calibration="first" calibrates
    "int8" on its first batch too (what the CLI's --precision int8 does)."""
    require_vit(model, "optimize")
    model = copy.deepcopy(model)
    if tome_r:
        apply_tome(model, tome_r)
    if isinstance(calibration, str):
        if calibration != "first":
            raise ConfigError(f"calibration must be a (B, C, H, W) tensor of images or 'first' (the first batch), "
                              f"got {calibration!r}")
        calibration, first = None, True
    else:
        first = False
    fast = OptimizedViT(model, backend=backend, pad_batches=pad_batches, attention_kernel=attention_kernel,
                        precision=precision)
    fast._calibrate_first = first and fast.precision == "int8" and fast.backend == "onednn"
    if tune_allocator and fast.backend != "eager" and next(model.parameters()).device.type == "cpu":
        tune_malloc()
    if calibration is not None and fast.backend == "onednn" and (fast.precision == "int8" or (
            fast._auto is not None and "int8" in fast._auto)):
        fast.calibrate_int8(calibration)
    if calibration is not None and fast._auto is not None:
        fast(calibration)
    return fast


__all__ = ["optimize", "OptimizedViT", "compile_frozen", "tune_malloc", "onednn_supported", "BACKENDS", "PRECISIONS",
           "precision_record"]
