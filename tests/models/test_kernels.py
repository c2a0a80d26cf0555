"""vitkit's CPU attention kernel: matches PyTorch's scaled_dot_product_attention for every shape the fast path
gives it (with ToMe's key bias, queries for a prefix only, odd lengths), refuses bad input with a message, and is
what vitkit.optimize runs unless told not to. Where it cannot be built (not x86-64 with MKL, no C++ compiler or
ninja, a build error) these tests skip with the reason; a kernel that builds but fails its self-check fails."""
import logging

import pytest
import torch
import torch.nn.functional as F

import vitkit
from vitkit.models import create_model, kernels


def _reference(qkv, nq, bias=None):
    q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)
    mask = bias[:, None, None, :] if bias is not None else None
    return F.scaled_dot_product_attention(q[:, :, :nq], k, v, attn_mask=mask).transpose(1, 2)


class _Reasons(logging.Handler):
    def __init__(self):
        super().__init__(logging.INFO)
        self.messages = []

    def emit(self, record):
        self.messages.append(record.getMessage())


@pytest.fixture(scope="module")
def kernel():
    """The built kernel; where it is off, a skip with the reason cpu_attention logs (a failed self-check fails)."""
    log, reasons = logging.getLogger(kernels.__name__), _Reasons()
    level = log.level
    log.addHandler(reasons)
    log.setLevel(logging.INFO)
    try:
        mod = kernels.cpu_attention()
        if mod is None and not reasons.messages:  # an earlier test's call was cached: once more, to hear why
            kernels.cpu_attention.cache_clear()
            mod = kernels.cpu_attention()
    finally:
        log.removeHandler(reasons)
        log.setLevel(level)
    if mod is not None:
        return mod
    why = next((m for m in reasons.messages if "is off" in m), "no reason logged")
    if "self-check" in why:
        pytest.fail(why)
    pytest.skip(why)


@pytest.mark.parametrize("shape,nq,with_bias", [
    ((2, 197, 6, 64), 197, False),   # ViT-S/16 at 224 px
    ((2, 197, 6, 64), 1, False),     # the class token only
    ((3, 50, 2, 32), 50, True),      # ToMe's log-size bias over keys
    ((1, 5, 1, 16), 3, True),        # shorter than one vector
    ((1, 1024, 2, 64), 1024, False),  # the longest sequence the fast path gives it
])
def test_kernel_matches_sdpa(kernel, shape, nq, with_bias):
    B, N, H, D = shape
    g = torch.Generator().manual_seed(0)
    qkv = torch.randn(B, N, 3, H, D, generator=g) * 2  # logits with some spread
    bias = torch.randn(B, N, generator=g) if with_bias else None
    got = kernel.attention(qkv, nq, bias)
    assert got.shape == (B, nq, H, D) and got.is_contiguous()
    assert (got - _reference(qkv, nq, bias)).abs().max().item() <= 1e-5


def test_kernel_refuses_bad_input(kernel):
    with pytest.raises(RuntimeError, match=r"qkv must be \(B, N, 3, H, D\)"):
        kernel.attention(torch.randn(2, 10, 4, 3, 8), 10)
    with pytest.raises(RuntimeError, match="contiguous float32"):
        kernel.attention(torch.randn(2, 10, 3, 2, 8).double(), 10)
    with pytest.raises(RuntimeError, match="nq must be"):
        kernel.attention(torch.randn(2, 10, 3, 2, 8), 11)


def test_optimize_runs_the_kernel_and_can_do_without(kernel):
    torch.manual_seed(0)
    m = create_model("vit_mini_patch4_28", depth=2).eval()
    x = torch.randn(3, 1, 28, 28)
    with torch.no_grad():
        plain = m(x)
    fast = vitkit.optimize(m)
    assert fast.backend == "onednn" and fast.attention == "vitkit"
    assert (fast(x) - plain).abs().max().item() <= 1e-4
    off = vitkit.optimize(m, attention_kernel=False)
    assert off.attention == "sdpa" and (off(x) - plain).abs().max().item() <= 1e-4


def test_the_kernel_can_be_switched_off(monkeypatch):
    monkeypatch.setenv("VITKIT_NO_KERNELS", "1")
    kernels.cpu_attention.cache_clear()
    try:
        assert kernels.cpu_attention() is None
        assert vitkit.optimize(create_model("vit_mini_patch4_28", depth=1).eval()).attention == "sdpa"
    finally:
        kernels.cpu_attention.cache_clear()


# ---- the int8 path's dynamic quantisation --------------------------------------------------------------------------
@pytest.mark.parametrize("n", [1, 15, 16, 17, 31, 33, 1000, 197 * 384 + 5])  # vector tails of 8, 16 and 32 values
@pytest.mark.parametrize("scale,shift", [(1.0, 0.0), (3.0, 1.0), (0.01, -2.0), (100.0, 50.0)])
def test_quantize_u8_equals_pytorchs_dynamic_quantisation(kernel, n, scale, shift):
    """Same scale, zero point and every value as quantize_per_tensor_dynamic (quint8): the vector narrowing rounds
    half to even and saturates as PyTorch does, for all-positive, all-negative and mixed ranges."""
    import warnings

    x = torch.randn(n, generator=torch.Generator().manual_seed(n)) * scale + shift
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        ref = torch.quantize_per_tensor_dynamic(x, torch.quint8, False)
    q, s, zp = kernel.quantize_u8(x)
    assert q.dtype == torch.uint8 and q.shape == x.shape
    assert s == pytest.approx(ref.q_scale(), rel=1e-6) and zp == ref.q_zero_point()
    assert torch.equal(q, ref.int_repr())


# ---- bf16 attention (AVX-512 BF16 dot products, or oneDNN's brgemm ukernel), for the bf16 fast path --------------
# Inputs are bf16 (exact in both); the kernel rounds the softmax probabilities to bf16 for E V (8 significant bits)
# and, with out_bf16, the output too: errors stay within 2^-8 (fp32 out) or 2^-7 (bf16 out) of the largest output.
@pytest.mark.parametrize("shape,nq,with_bias", [
    ((2, 197, 6, 64), 197, False),   # ViT-S/16 at 224 px
    ((2, 197, 6, 64), 1, False),     # the class token only
    ((3, 50, 2, 32), 50, True),      # ToMe's log-size bias over keys; an even length
    ((2, 37, 2, 48), 5, True),       # odd length, a head dim of three vectors, a prefix of queries
    ((1, 5, 1, 16), 3, False),       # shorter than one vector
    ((1, 300, 1, 128), 300, False),  # two column groups of 64 and ten 32-key blocks
])
def test_bf16_kernel_matches_sdpa_or_says_it_cannot_run(kernel, shape, nq, with_bias):
    B, N, H, D = shape
    g = torch.Generator().manual_seed(0)
    qkv = (torch.randn(B, N, 3, H, D, generator=g) * 2).bfloat16()
    bias = torch.randn(B, N, generator=g) if with_bias else None
    if not kernel.has_bf16():  # this CPU has no AVX-512 BF16: a clear refusal, and the fast path never calls it
        assert not kernels.bf16_attention_available()
        with pytest.raises(RuntimeError, match="no AVX-512 BF16"):
            kernel.attention_bf16(qkv, nq, bias, True)
        return
    want = _reference(qkv.float(), nq, bias)
    peak = want.abs().max().item()
    for brgemm in (False, True) if kernel.bf16_linear_available() else (False,):  # tiles, or the brgemm ukernel
        got32 = kernel.attention_bf16(qkv, nq, bias, False, brgemm)
        got16 = kernel.attention_bf16(qkv, nq, bias, True, brgemm)
        assert got32.dtype == torch.float32 and got16.dtype == torch.bfloat16
        assert got32.shape == got16.shape == (B, nq, H, D) and got16.is_contiguous()
        assert (got32 - want).abs().max().item() <= peak * 2 ** -8, brgemm
        assert (got16.float() - want).abs().max().item() <= peak * 2 ** -7, brgemm


def test_bf16_kernel_refuses_bad_input(kernel):
    if not kernel.has_bf16():
        pytest.skip("this CPU has no AVX-512 BF16 (the refusal is tested above)")
    with pytest.raises(RuntimeError, match="contiguous bfloat16"):
        kernel.attention_bf16(torch.randn(2, 10, 3, 2, 16), 10, None, True)
    with pytest.raises(RuntimeError, match="multiple of 16"):
        kernel.attention_bf16(torch.randn(2, 10, 3, 2, 8).bfloat16(), 10, None, True)
    with pytest.raises(RuntimeError, match="nq must be"):
        kernel.attention_bf16(torch.randn(2, 10, 3, 2, 16).bfloat16(), 0, None, True)


def _attention_candidates():
    """What `reduced_attention` measures here (head dims that are multiples of 16)."""
    bf16 = kernels.bf16_attention_available()
    return ("fp32",) + (("bf16",) if bf16 else ()) + (("bf16-brgemm",) if bf16 and kernels.brgemm_attention_available()
                                                      else ()) + (("sdpa-bf16",) if kernels.sdpa_bf16_available() else ())


@pytest.mark.parametrize("measured", kernels.ATTENTIONS)
@pytest.mark.parametrize("precision", ["bf16", "int8"])
def test_reduced_precision_runs_the_attention_that_measured_fastest(kernel, monkeypatch, precision, measured):
    """precision="bf16" and "int8" run the attention `reduced_attention` measured fastest among those that run here
    (vitkit's fp32 or bf16 kernel, the latter on the brgemm ukernel too, PyTorch's bf16 flash attention; only the
    fp32 kernel with VITKIT_NO_BF16_ATTENTION=1), and whichever runs stays within the precision's tolerance of the fp32 model. The
    measurement is replaced here (by one that picks `measured` where it is a candidate), so every outcome runs on any
    CPU that offers it."""
    from vitkit.models.fast import int8_fused_available
    from vitkit.models.precision import TOLERANCES

    asked = []

    def fake(tokens, heads, head_dim, cands):
        asked.append(((tokens, heads, head_dim), cands))
        return measured if measured in cands else "fp32"
    monkeypatch.setattr(kernels, "_measured_attention", fake)
    torch.manual_seed(0)
    m = create_model("vit_small_patch16_224", depth=2, img_size=64).eval()
    x = torch.randn(4, 3, 64, 64)
    with torch.no_grad():
        plain = m(x)
    fast = vitkit.optimize(m, precision=precision)
    got = fast(x)
    blocks = [b for packed in fast._packed.values() for b in packed]
    reduced = precision == "bf16" or int8_fused_available()
    cands = _attention_candidates()
    expect = measured if reduced and measured in cands else "fp32"
    assert all(b.attention == expect and b.bf16_attention == (expect != "fp32") for b in blocks)
    if reduced and len(cands) > 1:  # measured at the model's own sequence: 4 x 4 patches and the class token
        assert {a for a in asked} == {((17, 6, 64), cands)}
    tol = TOLERANCES[precision].rel
    assert ((got - plain).norm() / plain.norm()).item() <= tol
    monkeypatch.setenv("VITKIT_NO_BF16_ATTENTION", "1")
    off = vitkit.optimize(m, precision=precision)
    got_off = off(x)
    assert all(b.attention == "fp32" for packed in off._packed.values() for b in packed)
    assert ((got_off - plain).norm() / plain.norm()).item() <= tol


@pytest.mark.parametrize("with_bias", [False, True])
def test_sdpa_from_qkv_is_attention_in_the_kernels_layout(with_bias):
    """`sdpa_from_qkv` reads q, k, v from a qkv output (B, N, 3, H, hd) and returns (B, N, H, hd), with ToMe's
    key bias; exact in fp32, and in bf16 within 2^-7 of the largest output (bf16 inputs and probabilities)."""
    g = torch.Generator().manual_seed(0)
    qkv = torch.randn(2, 37, 3, 3, 32, generator=g)
    bias = torch.randn(2, 37, generator=g) if with_bias else None
    want = _reference(qkv, 37, bias)
    got = kernels.sdpa_from_qkv(qkv, bias)
    assert got.shape == (2, 37, 3, 32) and (got - want).abs().max().item() <= 1e-5
    got16 = kernels.sdpa_from_qkv(qkv.bfloat16(), bias)
    want16 = _reference(qkv.bfloat16().float(), 37, bias)
    assert got16.dtype == torch.bfloat16 and got16.reshape(2 * 37, 96).shape == (74, 96)
    assert (got16.float() - want16).abs().max().item() <= want16.abs().max().item() * 2 ** -7


def test_the_attention_choice_is_measured_once_per_shape(kernel, caplog):
    """reduced_attention times the candidates once per process and shape, logs the figures, and says "fp32" without
    measuring wherever no bf16 attention runs here."""
    cands = _attention_candidates()
    kernels._measured_attention.cache_clear()
    with caplog.at_level(logging.INFO, logger=kernels.__name__):
        first = kernels.reduced_attention(17, 2, 32)
        again = kernels.reduced_attention(17, 2, 32)
    assert first == again and first in cands
    lines = [r.getMessage() for r in caplog.records if "attention at 17 tokens" in r.getMessage()]
    if len(cands) == 1:
        assert first == "fp32" and not lines
        return
    assert len(lines) == 1 and lines[0].endswith(f"{first} kept")
    assert all(f"{c} " in lines[0] for c in cands)


def test_a_reload_checks_the_bf16_attention_afresh(kernel, monkeypatch):
    """A failed bf16 self-check turns the bf16 attention off for the loaded kernel only: cache_clear() and a new
    cpu_attention() check it again, so a stale mark never outlives the module it was about."""
    monkeypatch.delenv("VITKIT_NO_BF16_ATTENTION", raising=False)
    kernels._bf16_off.append(True)  # as a failed check leaves it
    assert not kernels.bf16_attention_available()
    kernels.cpu_attention.cache_clear()
    try:
        assert kernels.cpu_attention() is not None
        assert kernels.bf16_attention_available() == kernel.has_bf16()
    finally:
        kernels.cpu_attention.cache_clear()


_AVX2_CHECK = r"""
import warnings, torch, torch.nn.functional as F
from vitkit.models import kernels
assert torch.backends.cpu.get_cpu_capability() == "AVX2", torch.backends.cpu.get_cpu_capability()
mod = kernels.cpu_attention()
assert mod is not None and mod.__name__.endswith("avx2"), mod
g = torch.Generator().manual_seed(0)
for n in (1, 31, 32, 33, 197 * 384 + 5):  # the 32-value vector steps and their tails
    x = torch.randn(n, generator=g) * 3 + 1
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        ref = torch.quantize_per_tensor_dynamic(x, torch.quint8, False)
    q, s, zp = mod.quantize_u8(x)
    assert zp == ref.q_zero_point() and torch.equal(q, ref.int_repr()), n
qkv = torch.randn(2, 37, 3, 2, 16, generator=g)
q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)
want = F.scaled_dot_product_attention(q, k, v).transpose(1, 2)
assert (mod.attention(qkv, 37, None) - want).abs().max() <= 1e-5
if mod.bf16_linear_available():  # the bf16 linear's epilogue in 8-float vectors (GELU, residual, bf16 stores)
    x, w, b, r = torch.randn(37, 96, generator=g), torch.randn(128, 96, generator=g) * 0.1, torch.randn(128), torch.randn(37, 128)
    prod = x.bfloat16().float() @ w.bfloat16().float().t() + b
    wp = mod.pack_linear_bf16(w)
    assert (mod.linear_bf16(x, wp, b, False, r, False) - (prod + r)).abs().max() <= 1e-5 * (prod + r).abs().max()
    want = F.gelu(prod)
    assert (mod.linear_bf16(x, wp, b, True, None, True).float() - want).abs().max() <= 2 ** -8 * want.abs().max()
print("avx2 ok")
"""


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_the_avx2_build_of_the_kernel_quantises_and_attends_exactly(kernel, tmp_path):
    """The AVX2 build (what an AVX2-only CPU gets; AVX-512 CPUs run it too) is compiled in a child process with
    PyTorch's dispatch held at AVX2: its quantiser's 32-value steps and tails equal PyTorch's, its attention
    sdpa's, and (where the brgemm ukernel runs bf16) its bf16 linear the fp32 product."""
    import os
    import subprocess
    import sys

    if "avx2" not in open("/proc/cpuinfo").read():
        pytest.skip("this CPU has no AVX2")
    env = dict(os.environ, ATEN_CPU_CAPABILITY="avx2")
    out = subprocess.run([sys.executable, "-c", _AVX2_CHECK], env=env, capture_output=True, text=True, timeout=280)
    assert out.returncode == 0 and "avx2 ok" in out.stdout, out.stderr[-2000:]


# ---- bf16 linear on oneDNN's brgemm ukernel, for the bf16 fast path ----------------------------------------------
# The product of bf16-rounded inputs is accumulated in fp32, so against the same product computed in fp32 it is
# exact to fp32 rounding (1e-5 of the largest output here); a bf16 output adds its own rounding (2^-8 of the largest).
def _brgemm(kernel):
    if not kernel.bf16_linear_available():
        pytest.skip("oneDNN's brgemm ukernel does not run bf16 on this CPU (no AVX-512 BF16 or AMX)")
    return kernel


@pytest.mark.parametrize("dtype,v", [(torch.bfloat16, 2), (torch.int8, 4)])
def test_vitkits_vnni_packing_is_the_ukernels_layout(kernel, dtype, v):
    """Where PyTorch will not pack for the brgemm ukernel (no AMX: an AMD EPYC, say), vitkit packs the weights
    itself (`pack_vnni`): each block of 64 columns as (K / v, 64, v), v consecutive k side by side. Checked against
    that layout built by reshapes, and against what the linears pack (PyTorch's `cpublas::pack` where it packs)."""
    k, n = 96, 192
    wt = (torch.arange(k * n) % 251 - 125).reshape(k, n).to(dtype)
    want = wt.reshape(k // v, v, n // 64, 64).permute(2, 0, 3, 1).reshape(n // 64, k, 64)
    assert torch.equal(kernel.pack_vnni(wt), want)
    if dtype == torch.bfloat16 and kernel.bf16_linear_available():
        assert torch.equal(kernel.pack_linear_bf16(wt.t().float()), want)
    if dtype == torch.int8 and kernel.int8_linear_available():
        assert torch.equal(kernel.pack_linear_s8(wt.t().contiguous()), want)
    with pytest.raises(RuntimeError, match="pack_vnni: wt must be"):
        kernel.pack_vnni(torch.zeros(k, 96, dtype=dtype))


@pytest.mark.parametrize("m,k,n", [(197, 384, 1152), (1, 64, 64), (5, 96, 128), (33, 384, 192), (64, 1536, 64)])
@pytest.mark.parametrize("bf16_in", [False, True])
def test_bf16_linear_matches_the_fp32_product_of_its_bf16_inputs(kernel, m, k, n, bf16_in):
    kernel = _brgemm(kernel)
    g = torch.Generator().manual_seed(0)
    x, w = torch.randn(m, k, generator=g), torch.randn(n, k, generator=g) * 0.1
    b, res = torch.randn(n, generator=g), torch.randn(m, n, generator=g)
    wp = kernel.pack_linear_bf16(w)
    xin = x.bfloat16() if bf16_in else x
    prod = x.bfloat16().float() @ w.bfloat16().float().t() + b
    plain = kernel.linear_bf16(xin, wp, b, False, None, False)
    assert plain.dtype == torch.float32 and plain.shape == (m, n)
    assert (plain - prod).abs().max().item() <= 1e-5 * prod.abs().max().item()
    added = kernel.linear_bf16(xin, wp, b, False, res, False)
    assert (added - (prod + res)).abs().max().item() <= 1e-5 * (prod + res).abs().max().item()
    gelu = kernel.linear_bf16(xin, wp, b, True, None, True)
    want = F.gelu(prod)
    assert gelu.dtype == torch.bfloat16
    assert (gelu.float() - want).abs().max().item() <= 2 ** -8 * want.abs().max().item()
    gelu32 = kernel.linear_bf16(xin, wp, b, True, None, False)  # the GELU's own error: its rational erf, ~1e-6
    assert (gelu32 - want).abs().max().item() <= 1e-5 * want.abs().max().item()
    nobias = kernel.linear_bf16(xin, wp, None, False, None, False)
    assert (nobias - (prod - b)).abs().max().item() <= 1e-5 * prod.abs().max().item()


def test_bf16_linear_gelu_is_erf_gelu_to_a_few_ulp(kernel):
    """The epilogue's GELU (a rational erf and a fast reciprocal) against nn.GELU value by value: an identity weight
    passes each bf16 input through exactly, so the output is the GELU alone (|error| <= 2e-6 + 2e-6 |x| here)."""
    kernel = _brgemm(kernel)
    x = torch.linspace(-8, 8, 64 * 257).reshape(257, 64).bfloat16().float()
    got = kernel.linear_bf16(x, kernel.pack_linear_bf16(torch.eye(64)), None, True, None, False)
    want = F.gelu(x.double()).float()
    assert ((got - want).abs() <= 2e-6 + 2e-6 * x.abs()).all(), (got - want).abs().max()


def test_bf16_linear_refuses_bad_input(kernel):
    kernel = _brgemm(kernel)
    with pytest.raises(RuntimeError, match="multiple of 64"):
        kernel.pack_linear_bf16(torch.randn(96, 64))
    wp = kernel.pack_linear_bf16(torch.randn(64, 32))
    with pytest.raises(RuntimeError, match="does not fit"):
        kernel.linear_bf16(torch.randn(4, 48), wp, None, False, None, True)
    with pytest.raises(RuntimeError, match="bias must be"):
        kernel.linear_bf16(torch.randn(4, 32), wp, torch.randn(63), False, None, True)
    with pytest.raises(RuntimeError, match="residual must be"):
        kernel.linear_bf16(torch.randn(4, 32), wp, None, False, torch.randn(4, 65), False)


@pytest.mark.parametrize("brgemm_faster", [True, False])
def test_bf16_path_runs_the_linear_that_measured_faster(kernel, monkeypatch, brgemm_faster):
    """precision="bf16" runs each linear on vitkit's brgemm linear or oneDNN's prepacked one, whichever
    `_brgemm_faster` measured faster at the call's row count (rounded up to 32), input dtype and epilogue; both stay
    within bf16's tolerance of the fp32 model. The measurement is replaced here, so both outcomes run on any CPU
    that has the brgemm linear."""
    from vitkit.models import fast
    from vitkit.models.precision import TOLERANCES

    _brgemm(kernel)
    asked = []
    monkeypatch.setattr(fast, "_brgemm_faster", lambda *key: asked.append(key) or brgemm_faster)
    calls = {"brgemm": 0, "onednn": 0}
    for cls, name in ((fast._BrgemmLinear, "brgemm"), (fast._PackedLinear, "onednn")):
        for meth in ("__call__", "add"):
            orig = getattr(cls, meth)

            def spy(self, *a, _orig=orig, _name=name):
                if getattr(self, "dtype", torch.bfloat16) == torch.bfloat16:
                    calls[_name] += 1
                return _orig(self, *a)
            monkeypatch.setattr(cls, meth, spy)
    torch.manual_seed(0)
    m = create_model("vit_small_patch16_224", depth=2, img_size=64).eval()
    x = torch.randn(3, 3, 64, 64)
    with torch.no_grad():
        plain = m(x)
    fast_model = vitkit.optimize(m, precision="bf16")
    assert all(isinstance(getattr(b, k), fast._Bf16Linear) for b in fast_model._blocks
               for k in ("qkv", "proj", "fc1", "fc2"))
    got = fast_model(x)
    assert ((got - plain).norm() / plain.norm()).item() <= TOLERANCES["bf16"].rel
    used, unused = ("brgemm", "onednn") if brgemm_faster else ("onednn", "brgemm")
    assert calls[used] > 0 and calls[unused] == 0
    rows = 64  # 3 images x 17 tokens = 51 rows → the multiple of 32 above
    keys = {(r, k_, n, g_, add) for r, k_, n, g_, add, _ in asked}
    assert (rows, 384, 1152, False, False) in keys       # qkv (fp32 LayerNorm output)
    assert (rows, 384, 1536, True, False) in keys        # fc1 with its GELU
    assert any(k_ == 1536 and n == 384 and add for _, k_, n, _, add in keys)  # fc2 + residual


def test_the_bf16_linear_choice_is_measured_once_per_shape(kernel, caplog):
    from vitkit.models import fast

    _brgemm(kernel)
    fast._brgemm_faster.cache_clear()
    with caplog.at_level(logging.INFO, logger=fast.__name__):
        first = fast._brgemm_faster(32, 64, 128, True, False, False)
        again = fast._brgemm_faster(32, 64, 128, True, False, False)
    assert first == again and isinstance(first, bool)
    lines = [r.getMessage() for r in caplog.records if "bf16 linear 32x64x128 + GELU" in r.getMessage()]
    assert len(lines) == 1 and lines[0].endswith("brgemm" if first else "oneDNN")


def test_large_inputs_go_to_onednn_unmeasured(kernel, monkeypatch):
    """Above BRGEMM_MAX_ROWS rows the bf16 linear runs oneDNN's prepacked matmul without measuring (the brgemm
    linear is for small matrices), and at or below it asks the measurement."""
    from vitkit.models import fast

    _brgemm(kernel)
    asked = []
    monkeypatch.setattr(fast, "_brgemm_faster", lambda *key: asked.append(key) or True)
    lin = fast._Bf16Linear(torch.randn(64, 32), torch.randn(64))
    big, small = torch.randn(fast.BRGEMM_MAX_ROWS + 1, 32), torch.randn(fast.BRGEMM_MAX_ROWS, 32)
    assert lin._pick(big, False) is lin.onednn and lin._pick(big, True) is lin.onednn and not asked
    assert lin._pick(small, True) is lin.brgemm and asked == [(fast.BRGEMM_MAX_ROWS, 32, 64, False, True, False)]
    y = lin.add(big, torch.zeros(big.shape[0], 64))
    assert y.dtype == torch.float32 and y.shape == (fast.BRGEMM_MAX_ROWS + 1, 64)


def test_onednns_copy_of_a_weight_is_packed_only_when_a_call_runs_on_it(kernel, monkeypatch):
    """The bf16 and int8 linears hold the brgemm kernel's packed weight; oneDNN's is packed (from the same weight, to
    the same values) the first time a call is picked for oneDNN, so batch-1 use holds one reduced-precision copy."""
    from vitkit.models import fast

    _brgemm(kernel)
    torch.manual_seed(0)
    w, b, x = torch.randn(128, 64), torch.randn(128), torch.randn(40, 64)
    lin = fast._Bf16Linear(w, b)
    monkeypatch.setattr(fast, "_brgemm_faster", lambda *key: True)
    lin(x)
    assert lin._onednn is None
    big = torch.randn(fast.BRGEMM_MAX_ROWS + 1, 64)
    y = lin(big)
    assert lin._onednn is not None and torch.equal(y, fast._PackedLinear(w, b, dtype=torch.bfloat16)(big))
    if kernel.int8_linear_available() and fast.int8_fused_available():
        monkeypatch.setattr(fast, "_int8_brgemm_faster", lambda *key: True)
        q = fast._Int8Linear(w, b)
        q(x)
        assert q._weight is None
        monkeypatch.setattr(fast, "_int8_brgemm_faster", lambda *key: False)
        q2 = fast._Int8Linear(w, b)
        eager = fast._Int8Linear(w, b)
        assert eager.weight is not None  # packed now
        assert torch.equal(q2(x), eager._onednn(*eager._quantize(x), None)) and q2._weight is not None


def test_bf16_linear_adds_a_residual_that_repeats_every_r_rows(kernel):
    """A residual of R rows (R dividing M) is added to rows i with residual row i % R, as adding it repeated: the
    patch embedding adds each image's position embedding this way."""
    _brgemm(kernel)
    torch.manual_seed(0)
    w, b, x, pos = torch.randn(128, 96), torch.randn(128), torch.randn(3 * 10, 96), torch.randn(10, 128)
    wp = kernel.pack_linear_bf16(w)
    want = kernel.linear_bf16(x, wp, b, False, pos.repeat(3, 1), False)
    assert torch.equal(kernel.linear_bf16(x, wp, b, False, pos, False), want)
    with pytest.raises(RuntimeError, match="residual must be .* with R dividing 30"):
        kernel.linear_bf16(x, wp, b, False, torch.randn(7, 128), False)


@pytest.mark.parametrize("shape,patch", [((2, 3, 64, 48), 16), ((1, 1, 28, 28), 7), ((1, 3, 32, 32), 8)])
def test_patch_cols_are_the_images_patches_in_bf16_twice(kernel, shape, patch):
    """`patch_cols` is the strided view, bf16 cast and [x, x] repeat of `_PatchLinear` in one pass, bit for bit;
    an image that is not a whole number of patches is refused with the sizes."""
    x = torch.randn(*shape)
    B, C, H, W = shape
    want = x.reshape(B, C, H // patch, patch, W // patch, patch).permute(0, 2, 4, 1, 3, 5).to(torch.bfloat16)
    want = want.reshape(-1, C * patch * patch).repeat(1, 2)
    assert torch.equal(kernel.patch_cols(x, patch, patch), want)
    with pytest.raises(RuntimeError, match="image size 30x32 is not a multiple of the patch size 16x16"):
        kernel.patch_cols(torch.randn(1, 3, 30, 32), 16, 16)


@pytest.mark.parametrize("m,k", [(197, 384), (5, 100), (3, 37), (64, 768)])
def test_layer_norm_matches_torch(kernel, m, k):
    """layer_norm (the bf16 and int8 paths' block norms) against F.layer_norm in float64: fp32 output to 2e-6 of
    these O(1-10) values (ATen's own error here is ~1e-6), bf16 output to bf16's rounding (2^-8 relative), without
    affine parameters too; row lengths with and without a vector tail."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(m, k, generator=g) * 3 + 1
    w, b = torch.randn(k, generator=g), torch.randn(k, generator=g)
    want = F.layer_norm(x.double(), (k,), w.double(), b.double(), 1e-6)
    got = kernel.layer_norm(x, w, b, 1e-6, False)
    assert got.dtype == torch.float32 and (got - want).abs().max().item() <= 2e-6 * want.abs().max().item()
    got16 = kernel.layer_norm(x, w, b, 1e-6, True)
    assert got16.dtype == torch.bfloat16
    assert ((got16.double() - want).abs() <= 2 ** -8 * want.abs() + 1e-6).all()
    plain = kernel.layer_norm(x, None, None, 1e-5, False)
    assert (plain - F.layer_norm(x.double(), (k,), eps=1e-5)).abs().max().item() <= 2e-6


def test_layer_norm_refuses_bad_input(kernel):
    with pytest.raises(RuntimeError, match="x must be a"):
        kernel.layer_norm(torch.randn(2, 3, 4), None, None, 1e-6, False)
    with pytest.raises(RuntimeError, match="weight and bias must be"):
        kernel.layer_norm(torch.randn(2, 8), torch.randn(7), None, 1e-6, False)


# ---- int8 linear (uint8 x int8) on oneDNN's brgemm ukernel, for the int8 path --------------------------------------
def _int8(kernel):
    from vitkit.models import fast

    if not kernel.int8_linear_available():
        pytest.skip("oneDNN's brgemm ukernel does not run int8 on this CPU (no AVX-512 VNNI or AMX)")
    if not fast.int8_fused_available():
        pytest.skip("this PyTorch build has no oneDNN int8 matmul to compare with")
    return fast


@pytest.mark.parametrize("m,k,n,gelu,add,out_kind", [
    (197, 384, 1152, False, False, 1),  # qkv → the bf16 attention
    (197, 384, 384, False, True, 0),    # proj + the fp32 residual
    (197, 384, 1536, True, False, 2),   # fc1 + GELU → uint8 over fc2's static range
    (197, 1536, 384, False, True, 0),   # fc2 + residual
    (5, 64, 128, True, False, 0),       # fewer rows than a tile
    (33, 96, 64, False, False, 1),      # one row past a tile
])
def test_int8_linear_matches_onednns_int8_matmul(kernel, m, k, n, gelu, add, out_kind):
    """linear_u8s8 computes what oneDNN's qlinear_pointwise does from the same uint8 input and int8 weight: fp32
    outputs to 1e-5 of the largest (the order of the fp32 epilogue), bf16 to one bf16 rounding, uint8 within one
    step (a value on a rounding boundary) on at most 1% of the outputs."""
    fast = _int8(kernel)
    g = torch.Generator().manual_seed(m + k + n)
    w, b = torch.randn(n, k, generator=g) * 0.05, torch.randn(n, generator=g)
    x = torch.randn(m, k, generator=g) * 2
    lin = fast._Int8Linear(w, b, act=torch.nn.GELU() if gelu else None,
                           out_dtype=torch.bfloat16 if out_kind == 1 else torch.float32,
                           out_qparams=(0.05, 10) if out_kind == 2 else None)
    assert lin.s8 is not None
    qx, s, zp = lin._quantize(x)
    other = torch.randn(m, n, generator=g) if add else None
    with torch.inference_mode():
        want, got = lin._onednn(qx, s, zp, other), lin._brgemm(qx, s, zp, other)
    if out_kind == 2:
        assert got.values.dtype == torch.uint8 and (got.scale, got.zero_point) == (want.scale, want.zero_point)
        diff = (got.values.int() - want.values.int()).abs()
        assert diff.max().item() <= 1 and (diff > 0).float().mean().item() <= 0.01
        return
    assert got.dtype == want.dtype == (torch.bfloat16 if out_kind == 1 else torch.float32) and got.shape == (m, n)
    peak = want.float().abs().max().item()
    tol = peak * 1e-5 if out_kind == 0 else peak * 2 ** -8
    assert (got.float() - want.float()).abs().max().item() <= tol


def test_int8_linear_refuses_bad_input(kernel):
    _int8(kernel)
    with pytest.raises(RuntimeError, match="multiple of 64"):
        kernel.pack_linear_s8(torch.zeros(96, 64, dtype=torch.int8))
    wp = kernel.pack_linear_s8(torch.zeros(64, 32, dtype=torch.int8))
    scale, colsum = torch.ones(64), torch.zeros(64, dtype=torch.int32)
    with pytest.raises(RuntimeError, match="uint8 matrix"):
        kernel.linear_u8s8(torch.zeros(4, 32), 1.0, 0, wp, scale, colsum, None, False, None, 0, 1.0, 0)
    with pytest.raises(RuntimeError, match="does not fit"):
        kernel.linear_u8s8(torch.zeros(4, 48, dtype=torch.uint8), 1.0, 0, wp, scale, colsum, None, False, None, 0,
                           1.0, 0)
    with pytest.raises(RuntimeError, match="out_kind"):
        kernel.linear_u8s8(torch.zeros(4, 32, dtype=torch.uint8), 1.0, 0, wp, scale, colsum, None, False, None, 3,
                           1.0, 0)


@pytest.mark.parametrize("brgemm_faster", [True, False])
def test_int8_path_runs_the_linear_that_measured_faster(kernel, monkeypatch, brgemm_faster):
    """precision="int8" runs each int8 linear on vitkit's brgemm kernel or oneDNN's int8 matmul, whichever
    `_int8_brgemm_faster` measured faster at the call's row count (rounded up to 32), epilogue and output; both
    stay within int8's tolerance of the fp32 model, and the other one is never called. The measurement is replaced
    here, so both outcomes run on any CPU that has the kernel."""
    from vitkit.models.precision import TOLERANCES

    fast = _int8(kernel)
    asked, calls = [], {"brgemm": 0, "onednn": 0}
    monkeypatch.setattr(fast, "_int8_brgemm_faster", lambda *key: asked.append(key) or brgemm_faster)
    for name in ("brgemm", "onednn"):
        real = getattr(fast._Int8Linear, f"_{name}")

        def spy(self, *a, _real=real, _name=name):
            calls[_name] += 1
            return _real(self, *a)
        monkeypatch.setattr(fast._Int8Linear, f"_{name}", spy)
    torch.manual_seed(0)
    m = create_model("vit_small_patch16_224", depth=2, img_size=64).eval()
    x = torch.randn(3, 3, 64, 64)
    with torch.no_grad():
        plain = m(x)
    got = vitkit.optimize(m, precision="int8")(x)
    assert ((got - plain).norm() / plain.norm()).item() <= TOLERANCES["int8"].rel
    used, unused = ("brgemm", "onednn") if brgemm_faster else ("onednn", "brgemm")
    assert calls[used] > 0 and calls[unused] == 0
    keys = {(r, k_, n, g_, add) for r, k_, n, g_, add, _ in asked}
    assert (64, 384, 1152, False, False) in keys  # qkv: 3 images x 17 tokens = 51 rows → 64
    assert (64, 384, 1536, True, False) in keys   # fc1 with its GELU


def _whole_block_model():
    torch.manual_seed(0)
    return create_model("vit_small_patch16_224", depth=3, img_size=64).eval()


def _forward_both_ways(fast_model, x, monkeypatch):
    """The model's outputs with its blocks in one call each and step by step, and how many blocks ran in one call."""
    from vitkit.models import fast

    calls = []
    real = fast_model._blocks[0].kernel.block_forward

    class Spy:  # the kernel module with block_forward counted
        def __init__(self, mod):
            self.mod = mod

        def __getattr__(self, name):
            return getattr(self.mod, name)

        def block_forward(self, *a):
            calls.append(1)
            return real(*a)
    for blk in fast_model._blocks:
        blk.kernel = Spy(blk.kernel)
    outs = []
    for whole in (True, False):
        monkeypatch.setattr(fast, "WHOLE_BLOCK", whole)
        for blk in fast_model._blocks:
            blk._wholes.clear()
        outs.append(fast_model(x))
    return outs[0], outs[1], len(calls)


@pytest.mark.parametrize("precision", ["bf16", "int8", "int8-calibrated", "int8-mixed"])
def test_a_block_in_one_call_is_the_step_by_step_block_bit_for_bit(kernel, monkeypatch, precision):
    """Where every linear of a block runs on the brgemm ukernel, the block runs as one kernel call
    (`block_forward`: the same kernel calls without the Python between them), with the same outputs bit for bit:
    bf16; int8 with dynamic inputs; calibrated int8 (fc1 writing uint8 for fc2); a calibrated plan that keeps some
    linears in bf16. The last block (class token only) stays step by step; ToMe's merging too."""
    from vitkit.models import fast

    _brgemm(kernel)
    if precision != "bf16":
        _int8(kernel)
    monkeypatch.setattr(fast, "_brgemm_faster", lambda *key: True)
    monkeypatch.setattr(fast, "_int8_brgemm_faster", lambda *key: True)
    m = _whole_block_model()
    x = torch.randn(2, 3, 64, 64)
    fast_model = vitkit.optimize(m, precision="bf16" if precision == "bf16" else "int8")
    if precision in ("int8-calibrated", "int8-mixed"):
        plan = fast_model.calibrate_int8(torch.randn(32, 3, 64, 64))
        assert plan.fc2_ranges is not None  # fc1 writes uint8 over fc2's static input range
        plan.layers = [{k: "int8" for k in blk} for blk in plan.layers]  # whatever the random weights' errors
        if precision == "int8-mixed":
            plan.layers[0]["fc2"], plan.layers[1]["qkv"], plan.layers[1]["fc1"] = "bf16", "bf16", "bf16"
        fast_model.use_int8_plan(plan)
    whole, steps, calls = _forward_both_ways(fast_model, x, monkeypatch)
    assert torch.equal(whole, steps)
    assert calls == len(fast_model._blocks) - 1  # every block but the last (prefix tokens only)
    with torch.no_grad():
        plain = m(x)
    assert ((whole - plain).norm() / plain.norm()).item() < 0.1
    m.tome_r = 2  # merging: step by step, as before
    merged = vitkit.optimize(m, precision="bf16")
    _, _, calls = _forward_both_ways(merged, x, monkeypatch)
    assert calls == 0


@pytest.mark.parametrize("precision", ["bf16", "int8"])
def test_vitkit_no_brgemm_keeps_every_matmul_on_onednns_ops(kernel, monkeypatch, precision):
    """VITKIT_NO_BRGEMM=1: no linear is packed for the brgemm kernels, attention is not the brgemm variant, no block
    runs in one call; the outputs stay within the precision's tolerance of the default path's."""
    from vitkit.models import fast
    from vitkit.models.precision import TOLERANCES

    _brgemm(kernel)
    x = torch.randn(2, 3, 64, 64)
    default = vitkit.optimize(_whole_block_model(), precision=precision)(x)
    monkeypatch.setenv("VITKIT_NO_BRGEMM", "1")
    assert not kernels.brgemm_allowed() and not kernels.brgemm_attention_available()
    assert not fast.brgemm_linear_available(384, 384) and not fast.brgemm_int8_available(384, 384)
    fast_model = vitkit.optimize(_whole_block_model(), precision=precision)
    got, _, calls = _forward_both_ways(fast_model, x, monkeypatch)
    assert calls == 0
    for blk in fast_model._blocks:
        assert blk.attention != "bf16-brgemm"
        for lin in (blk.qkv, blk.proj, blk.fc1, blk.fc2):
            assert not isinstance(lin, fast._Bf16Linear) and getattr(lin, "s8", None) is None
    assert ((got - default).norm() / default.norm()).item() <= TOLERANCES[precision].rel


@pytest.mark.parametrize("one_call_faster", [True, False])
def test_a_block_whose_linears_picked_onednn_runs_whichever_measured_faster(kernel, monkeypatch, one_call_faster):
    """Where the step-by-step path picked oneDNN for some linear, the block in one call (all on brgemm) runs only if
    `_whole_faster` measured it faster; the measurement is injected here, then run for real once."""
    from vitkit.models import fast

    _brgemm(kernel)
    monkeypatch.setattr(fast, "_brgemm_faster", lambda *key: False)
    asked = []
    monkeypatch.setattr(fast._PackedBlock, "_whole_faster",
                        lambda self, rows, tokens: asked.append((rows, tokens)) or one_call_faster)
    fast_model = vitkit.optimize(_whole_block_model(), precision="bf16")
    x = torch.randn(2, 3, 64, 64)
    whole, steps, calls = _forward_both_ways(fast_model, x, monkeypatch)
    assert asked == [(2 * 17, 17)] * (len(fast_model._blocks) - 1)
    assert calls == (len(fast_model._blocks) - 1 if one_call_faster else 0)
    assert ((whole - steps).norm() / steps.norm()).item() < 1e-2  # brgemm and oneDNN: both bf16 products
    monkeypatch.undo()
    blk = fast_model._blocks[0]
    blk._wholes.clear()
    monkeypatch.setattr(fast, "_brgemm_faster", lambda *key: False)
    assert isinstance(blk._whole(34, 17), bool) and blk._wholes == {34: blk._whole(34, 17)}


@pytest.mark.parametrize("attention", ["bf16", "bf16-brgemm"])
def test_a_prefix_only_bf16_block_is_the_whole_blocks_prefix_bit_for_bit(kernel, monkeypatch, attention):
    """With the bf16 attention kernels, a last block that outputs the class token only takes its query from the whole
    qkv output (no split matmul, no fp32 attention): the logits are bit for bit those of all tokens then the head."""
    from vitkit.models import fast

    _brgemm(kernel)
    if attention not in _attention_candidates():
        pytest.skip(f"{attention} attention does not run here")
    monkeypatch.setattr(kernels, "_measured_attention", lambda tokens, heads, head_dim, cands: attention)
    monkeypatch.setattr(fast, "_brgemm_faster", lambda *key: True)
    split = []
    monkeypatch.setattr(fast._PackedBlock, "_split_qkv", lambda self: split.append(1))
    fast_model = vitkit.optimize(_whole_block_model(), precision="bf16")
    x = torch.randn(3, 3, 64, 64)
    with torch.inference_mode():
        prefix_only, every_token = fast_model(x), fast_model.forward_head(fast_model.forward_features(x))
    assert torch.equal(prefix_only, every_token) and not split
