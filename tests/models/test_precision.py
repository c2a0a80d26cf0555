"""vitkit.optimize(precision=...): bf16 and int8 against fp32 on fixed inputs (the tolerances are
vitkit.models.precision.TOLERANCES: bf16 relative error <= 0.03, int8 <= 0.08, top-1 agreement >= 99%), `auto` never
keeping a candidate that fails its agreement check, the timing cache keyed by CPU model, and the fallbacks."""
import json
import logging
import sys

import pytest
import torch

import vitkit
from vitkit.errors import ConfigError
from vitkit.models import fast as fast_mod
from vitkit.models import precision as prec
from vitkit.models.precision import TOLERANCES, Choice, agreement, agrees, choose


@pytest.fixture(autouse=True)
def _cache(tmp_path, monkeypatch):
    monkeypatch.setenv("VITKIT_CACHE", str(tmp_path / "cache"))


@pytest.fixture(scope="module")
def model(digits_model):
    """The suite's trained digit ViT (tests/conftest.py): real weights, so precisions are compared as in use."""
    return vitkit.load(digits_model).eval()


@pytest.fixture(scope="module")
def images(model):
    """64 held-out digits the model never saw, normalised as it expects."""
    from tasks._digits import mnist5k

    _, (x, _) = mnist5k()
    return (x[:64] - 0.5) / 0.5


@pytest.fixture(scope="module")
def confident(model, images):
    """The 32 of those digits with the clearest fp32 decision (top-1 logit margin), where no precision's rounding
    may flip the class: auto's own check on them must pass for bf16 and int8 alike."""
    with torch.inference_mode():
        top2 = model(images).topk(2, dim=1).values
    return images[(top2[:, 0] - top2[:, 1]).argsort(descending=True)[:32]]


def _plain(model, x):
    with torch.inference_mode():
        return model(x), model.forward_features(x)


@pytest.mark.parametrize("precision", ["bf16", "int8"])
def test_each_precision_agrees_with_fp32_within_its_tolerance(model, images, precision, caplog):
    fast = vitkit.optimize(model, precision=precision)
    want, want_tokens = _plain(model, images)
    if precision == "bf16" and not prec.bf16_native(torch.device("cpu")):
        assert fast.precision == "fp32"  # no native bf16 here: the fallback (tested on its own below)
        return
    assert fast.precision == precision and fast.backend == "onednn"
    got, tokens = fast(images), fast.forward_features(images)
    tol = TOLERANCES[precision]
    stats = agreement(got, want, logits=True)
    # the stated tolerances: relative error within TOLERANCES; top-1 equal to fp32's on at least 60 of the 64
    # digits (a digit on the fence between two classes may tip, differently on different CPUs' kernels)
    assert 1e-5 < stats["rel"] <= tol.rel, stats  # it really ran in the reduced precision
    assert stats["top1"] >= 60 / 64, stats
    assert agreement(tokens, want_tokens, logits=False)["rel"] <= tol.rel
    emb = fast.embed_images(images)
    with torch.inference_mode():
        want_emb = model.forward_head(model.forward_features(images), pre_logits=True)
    assert agreement(emb, want_emb, logits=False)["cosine"] >= tol.cosine
    assert got.dtype == torch.float32 and emb.dtype == torch.float32


def test_int8_without_onednn_fused_op_uses_pytorch_quantized_linear(model, images, monkeypatch):
    """Where the build lacks oneDNN's fused int8 matmul, quantized::linear_dynamic runs it; same tolerance."""
    fused = vitkit.optimize(model, precision="int8")(images)
    monkeypatch.setattr(fast_mod, "int8_fused_available", lambda: False)
    fallback = vitkit.optimize(model, precision="int8")
    assert not fallback._blocks[0].fc1.fused
    got = fallback(images)
    want, _ = _plain(model, images)
    stats = agreement(got, want, logits=True)
    assert stats["rel"] <= TOLERANCES["int8"].rel and stats["top1"] >= 60 / 64, stats
    assert agreement(got, fused, logits=True)["rel"] <= TOLERANCES["int8"].rel


def test_unavailable_precision_falls_back_to_fp32_with_one_line_notice(model, images, monkeypatch, caplog):
    monkeypatch.setattr(prec, "bf16_native", lambda device: False)
    with caplog.at_level(logging.WARNING, logger="vitkit.models.fast"):
        fast = vitkit.optimize(model, precision="bf16")
    assert fast.precision == "fp32"
    assert len(caplog.records) == 1 and "bf16 is not available here" in caplog.records[0].getMessage()
    assert "\n" not in caplog.records[0].getMessage()
    want, _ = _plain(model, images)
    torch.testing.assert_close(fast(images), want, atol=1e-4, rtol=1e-4)
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="vitkit.models.fast"):
        eager = vitkit.optimize(model, precision="int8", backend="eager")
    assert eager.precision == "fp32" and "oneDNN path only" in caplog.records[0].getMessage()
    with pytest.raises(ConfigError, match="precision must be one of"):
        vitkit.optimize(model, precision="fp16")


def test_bf16_off_the_onednn_path_runs_under_autocast(model, images, monkeypatch):
    monkeypatch.setattr(prec, "bf16_native", lambda device: True)
    eager = vitkit.optimize(model, precision="bf16", backend="eager")
    want, _ = _plain(model, images)
    got = eager(images)
    assert eager.precision == "bf16" and got.dtype == torch.float32
    stats = agreement(got, want, logits=True)
    assert 1e-5 < stats["rel"] <= TOLERANCES["bf16"].rel


class _Times(dict):
    """A precision cache that claims every key was measured with these times."""

    def __init__(self, seconds):
        super().__init__()
        self.seconds = seconds

    def get(self, key, default=None):
        return {"seconds": self.seconds}


def test_auto_never_keeps_a_candidate_that_fails_its_check(model, confident, monkeypatch):
    """int8 is made the fastest and broken (outputs scaled): auto must not pick it, and must say why."""
    monkeypatch.setattr(prec, "candidates", lambda device, backend: ("fp32", "bf16", "int8"))
    monkeypatch.setattr(prec, "bf16_native", lambda device: True)
    monkeypatch.setattr(prec, "_read_cache", lambda: _Times({"fp32": 1.0, "bf16": 0.5, "int8": 0.1}))
    monkeypatch.setattr(fast_mod, "candidates", prec.candidates)
    broken = fast_mod._Int8Linear.__call__
    scaled = lambda y: y if isinstance(y, fast_mod._Quantized) else y * 1.5  # noqa: E731 - uint8 levels stay
    monkeypatch.setattr(fast_mod._Int8Linear, "__call__", lambda self, x: scaled(broken(self, x)))
    monkeypatch.setattr(fast_mod._Int8Linear, "add", lambda self, x, other: other + broken(self, x) * 1.5)
    fast = vitkit.optimize(model, precision="auto", calibration=confident)
    assert fast.precision == "bf16", fast.choice
    assert "int8" in fast.choice.rejected and "differ from fp32" in fast.choice.rejected["int8"]
    assert fast.choice.cached
    # ... and with bf16 broken too, fp32 (always a candidate, always agreeing) is what is left
    packed = fast_mod._PackedLinear.__call__
    monkeypatch.setattr(fast_mod._PackedLinear, "__call__", lambda self, x: packed(self, x) * (
        0.0 if self.dtype == torch.bfloat16 else 1.0))
    # bf16 linears may also run on vitkit's brgemm linear (whichever measured faster here): broken alike
    brgemm = fast_mod._BrgemmLinear.__call__
    monkeypatch.setattr(fast_mod._BrgemmLinear, "__call__", lambda self, x: brgemm(self, x) * 0.0)
    monkeypatch.setattr(fast_mod._BrgemmLinear, "add", lambda self, x, other: other + brgemm(self, x) * 0.0)
    fast = vitkit.optimize(model, precision="auto", calibration=confident)
    assert fast.precision == "fp32" and set(fast.choice.rejected) == {"bf16", "int8"}


@pytest.mark.parametrize("pick", ["bf16", "fp32"])
def test_autos_pick_other_than_int8_runs_on_the_models_own_weights(model, confident, images, monkeypatch, pick):
    """auto calibrates its int8 candidate, which folds SmoothQuant into the weights (exact in fp32, not in bf16's
    roundings); where it then picks bf16 or fp32, those weights are put back: its outputs are precision=<pick>'s,
    bit for bit, and no int8 plan is recorded."""
    times = {"fp32": 1.0, "bf16": 0.5 if pick == "bf16" else 2.0, "int8": 5.0}
    monkeypatch.setattr(prec, "candidates", lambda device, backend: ("fp32", "bf16", "int8"))
    monkeypatch.setattr(prec, "bf16_native", lambda device: True)
    monkeypatch.setattr(prec, "_read_cache", lambda: _Times(times))
    monkeypatch.setattr(fast_mod, "candidates", prec.candidates)
    for calibration in (confident, None):  # images given, or auto's first batch
        auto = vitkit.optimize(model, precision="auto", calibration=calibration)
        got = auto(confident)
        assert auto.precision == pick and auto.int8_plan is None and auto._unsmoothed is None, auto.choice
        assert "precision_int8" not in fast_mod.precision_record(auto)
        want = vitkit.optimize(model, precision=pick)
        assert torch.equal(got, want(confident)) and torch.equal(auto(images), want(images))


def test_choose_picks_the_fastest_that_agrees_and_caches_per_cpu(monkeypatch, tmp_path):
    calls = []
    outs = {"fp32": torch.tensor([[4.0, 1.0, 0.0]] * 8), "bf16": torch.tensor([[4.01, 1.0, 0.0]] * 8),
            "int8": torch.tensor([[0.0, 1.0, 4.0]] * 8)}  # int8 flips every top-1

    def run(p):
        calls.append(p)
        return outs[p]
    monkeypatch.setattr(prec, "cpu_key", lambda: "CPU A | family 1")
    key = prec.shape_key("sig", 8, torch.device("cpu"))
    c = choose(run, ("fp32", "bf16", "int8"), key, logits=True, batch=8, reps=2)
    assert isinstance(c, Choice) and not c.cached and len(calls) == 3 + 3 * 2
    assert "int8" in c.rejected and c.agreement["int8"]["top1"] == 0.0
    assert c.precision in ("fp32", "bf16") and "precision " in c.summary()
    entries = json.loads(prec.cache_path().read_text())["entries"]
    assert list(entries) == [key] and "CPU A" in key
    calls.clear()
    again = choose(run, ("fp32", "bf16", "int8"), key, logits=True, batch=8)
    assert again.cached and calls == ["fp32", "bf16", "int8"]  # the agreement check only, no timing
    assert again.seconds == c.seconds
    # another CPU model: another key, measured anew, both kept
    monkeypatch.setattr(prec, "cpu_key", lambda: "CPU B | family 2")
    key_b = prec.shape_key("sig", 8, torch.device("cpu"))
    calls.clear()
    assert not choose(run, ("fp32", "bf16"), key_b, logits=True, batch=8, reps=1).cached and len(calls) == 4
    assert set(json.loads(prec.cache_path().read_text())["entries"]) == {key, key_b}
    # another version of the fast path's code: its own key, measured anew (old times never outlive the code)
    monkeypatch.setattr(prec, "code_key", lambda: "0123456789")
    key_c = prec.shape_key("sig", 8, torch.device("cpu"))
    assert key_c not in (key, key_b) and "vitkit 0123456789" in key_c
    calls.clear()
    assert not choose(run, ("fp32", "bf16"), key_c, logits=True, batch=8, reps=1).cached and len(calls) == 4


def test_agreement_rules():
    ref = torch.tensor([[3.0, 0.0]] * 200)
    one_flip = ref.clone()
    one_flip[0] = torch.tensor([0.0, 3.0])
    tol = TOLERANCES["bf16"]
    # 1 flip in 200 (99.5%) is within top-1 >= 99% ... but 1 in 8 is not (1% of 8 rounds down to no image)
    st = agreement(one_flip, ref, logits=True)
    assert st["top1"] == pytest.approx(0.995)
    assert agrees(dict(st, rel=0.0), tol, 200) and not agrees(dict(st, rel=0.031), tol, 200)
    st8 = agreement(one_flip[:8], ref[:8], logits=True)
    assert st8["top1"] == 0.875 and not agrees(dict(st8, rel=0.0), tol, 8)
    assert agrees(agreement(ref[:8], ref[:8], logits=True), tol, 8)
    assert not agrees({"rel": float("nan"), "cosine": 1.0}, tol, 8)
    feats = agreement(torch.tensor([[1.0, 0.0], [0.0, 1.0]]), torch.tensor([[1.0, 0.0], [1.0, 0.0]]), logits=False)
    assert feats["cosine"] == 0.0 and not agrees(feats, tol, 2)


def test_precision_record_and_auto_on_a_machine_with_one_candidate(model, images, monkeypatch):
    monkeypatch.setattr(fast_mod, "candidates", lambda device, backend: ("fp32",))
    fast = vitkit.optimize(model, precision="auto")
    fast(images)
    assert fast.precision == "fp32" and fast.choice is None
    assert fast_mod.precision_record(fast) == {"precision": "fp32"}
    assert fast_mod.precision_record(model) == {"precision": "fp32"}


# ---- calibrated int8 (vitkit.models.quantize) ---------------------------------------------------------------------
def _outlier_model(fc2_outlier: bool = False):
    """A tiny random ViT whose first block has one LayerNorm output channel 50x the others (its qkv column scaled
    down to match, so fp32 outputs are the same function) and, with fc2_outlier, one fc1 channel feeding fc2 with
    values ~100x the rest: the two kinds of outlier real ImageNet ViTs have (vitkit.models.quantize)."""
    from vitkit.models import create_model

    torch.manual_seed(0)
    m = create_model("vit_mini_patch4_28", depth=2).eval()
    with torch.no_grad():
        for p in m.parameters():
            p.normal_(0, 0.05) if p.dim() > 1 else p.normal_(0, 0.02)
        for blk in m.blocks:
            blk.norm1.weight.fill_(1.0), blk.norm2.weight.fill_(1.0)
        blk = m.blocks[0]
        blk.norm1.weight[3] = 50.0
        blk.attn.qkv.weight[:, 3] /= 50.0
        if fc2_outlier:
            blk.mlp.fc1.weight[5] *= 100.0
            blk.mlp.fc1.bias[5] = 100.0
    return m


def test_smoothing_is_exact_in_fp32():
    """SmoothQuant's factors folded into the norms and v change the weights but not the fp32 function."""
    from vitkit.models import quantize

    m = _outlier_model()
    x = torch.randn(8, 1, 28, 28)
    smoothed = __import__("copy").deepcopy(m)
    quantize.smooth(smoothed, quantize.input_ranges(smoothed, x), alpha=0.5)
    assert not torch.equal(smoothed.blocks[0].norm1.weight, m.blocks[0].norm1.weight)
    assert not torch.equal(smoothed.blocks[0].attn.qkv.weight[-32:], m.blocks[0].attn.qkv.weight[-32:])  # v rows
    with torch.inference_mode():
        torch.testing.assert_close(smoothed(x), m(x), atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(smoothed.forward_features(x), m.forward_features(x), atol=1e-5, rtol=1e-4)
    # the outlier channel's range is what smoothing moved into the weights
    after = quantize.input_ranges(smoothed, x)[0]["qkv"]
    before = quantize.input_ranges(m, x)[0]["qkv"]
    assert after.max() / after.median() < 0.2 * before.max() / before.median()


def test_calibrated_int8_fixes_outliers_and_keeps_noisy_linears_out_of_int8(caplog):
    """On outlier channels, calibrated int8 (smoothing + a too-noisy fc2 kept in bf16/fp32) stays within int8's
    tolerance of fp32 (relative error <= TOLERANCES['int8'].rel = 0.08) and has under a quarter of plain dynamic
    int8's error, and the plan says which linear it kept out of int8."""
    from vitkit.models import quantize

    m = _outlier_model(fc2_outlier=True)
    g = torch.Generator().manual_seed(1)
    cal, x = torch.randn(32, 1, 28, 28, generator=g), torch.randn(16, 1, 28, 28, generator=g)
    with torch.inference_mode():
        want = m.forward_features(x)
    plain = vitkit.optimize(m, precision="int8")
    with caplog.at_level(logging.INFO, logger="vitkit.models.fast"):
        cal8 = vitkit.optimize(m, precision="int8", calibration=cal)
    assert cal8.precision == "int8" and cal8.int8_plan is not None and "calibrated on 32 images" in caplog.text
    assert cal8.int8_plan.layers[0]["fc2"] != "int8" and cal8.int8_plan.errors[0]["fc2"] > quantize.MAX_LAYER_ERROR
    assert cal8.int8_plan.layers[1] == {k: "int8" for k in ("qkv", "proj", "fc1", "fc2")}
    assert cal8._blocks[0].layers["fc2"] != "int8" and cal8._blocks[0].layers["qkv"] == "int8"
    err_plain = agreement(plain.forward_features(x), want, logits=False)["rel"]
    err_cal = agreement(cal8.forward_features(x), want, logits=False)["rel"]
    assert 1e-4 < err_cal <= TOLERANCES["int8"].rel and err_cal < err_plain / 4, (err_cal, err_plain)
    rec = fast_mod.precision_record(cal8)
    assert rec["precision"] == "int8" and rec["precision_int8"]["kept"] == {"0.fc2": cal8.int8_plan.layers[0]["fc2"]}
    assert rec["precision_int8"]["smoothing_alpha"] == 0.5 and rec["precision_int8"]["calibration_images"] == 32
    # every key is a precision key: manifests compare a model's identity with the precision record set aside
    assert all(k.startswith("precision") for k in rec), rec
    # the caller's model is untouched (the smoothing went into optimize's private copy)
    assert m.blocks[0].norm1.weight[3] == 50.0


def test_calibrated_int8_on_real_weights_and_auto_calibrates(model, images, confident, monkeypatch):
    """The digit model: calibrated int8 within int8's tolerance of fp32 (as test_each_precision...), and auto's int8
    candidate is the calibrated one (calibrated on the images given, or on its first batch). Each calibration hands
    its passes' freed memory back to the OS (`release_heap`)."""
    released = []
    real_release = fast_mod.release_heap
    monkeypatch.setattr(fast_mod, "release_heap", lambda: released.append(1) or real_release())
    fast = vitkit.optimize(model, precision="int8", calibration=images[32:])
    assert released == [1] and real_release() is sys.platform.startswith("linux")
    want, _ = _plain(model, images)
    stats = agreement(fast(images), want, logits=True)
    assert 1e-5 < stats["rel"] <= TOLERANCES["int8"].rel and stats["top1"] >= 60 / 64, stats
    plans = []
    real_calibrate = fast_mod.OptimizedViT.calibrate_int8
    monkeypatch.setattr(fast_mod.OptimizedViT, "calibrate_int8",
                        lambda self, x: plans.append(real_calibrate(self, x)) or plans[-1])
    auto = vitkit.optimize(model, precision="auto")
    auto(confident)
    if "int8" in prec.candidates(torch.device("cpu"), auto.backend):
        assert len(plans) == 1 and plans[0].images == len(confident)
        assert (auto.int8_plan is plans[0]) == (auto.precision == "int8")
    with pytest.raises(ConfigError, match="calibration must be a"):
        vitkit.optimize(model, precision="int8", calibration=images[0])


# ---- static fc2 input (calibrated with at least STATIC_MIN_IMAGES images) -----------------------------------------
def test_int8_linear_writes_uint8_over_a_static_range_and_saturates_beyond_it():
    """fc1 with a static output range writes the uint8 levels of its GELU output over that range (what fc2 then
    reads without quantising), values beyond the range saturating at 0 or 255, as fake quantisation computes them."""
    if not fast_mod.int8_fused_available():
        pytest.skip("no oneDNN fused int8 matmul in this build: int8 linears stay dynamic there")
    from vitkit.models.quantize import static_qparams

    torch.manual_seed(0)
    fc1 = torch.nn.Linear(48, 96)
    x = torch.randn(40, 48)
    plain = fast_mod._Int8Linear(fc1.weight, fc1.bias, act=torch.nn.GELU())
    with torch.inference_mode():
        y = plain(x)  # the fp32 GELU output of the same int8 matmul
        hi = float(y.quantile(0.9))  # a range that the top tenth of the values overshoots
        s, zp = static_qparams(min(float(y.min()), 0.0), hi)
        q = fast_mod._Int8Linear(fc1.weight, fc1.bias, act=torch.nn.GELU(), out_qparams=(s, zp))(x)
    assert isinstance(q, fast_mod._Quantized) and q.values.dtype == torch.uint8 and (q.scale, q.zero_point) == (s, zp)
    want = torch.clamp(torch.round(y / s) + zp, 0, 255)
    assert (q.values.float() - want).abs().max() <= 1  # one level: the epilogue's own rounding
    assert (q.values == 255).sum() >= (y > hi).sum() > 0  # the overshoot saturates
    fc2 = torch.nn.Linear(96, 48)
    lin2 = fast_mod._Int8Linear(fc2.weight, fc2.bias)
    with torch.inference_mode():
        out = lin2(q)  # reads the uint8 levels as they are
        ref = ((q.values.float() - zp) * s) @ fc2.weight.t() + fc2.bias
    assert ((out - ref).norm() / ref.norm()).item() <= 0.02  # only fc2's own weight rounding is left


def test_calibration_fixes_fc2s_input_range_with_enough_images(model, images):
    """With >= STATIC_MIN_IMAGES calibration images every int8 fc2 reads a static uint8 range that fc1 writes (the
    plan records it), within int8's tolerance of fp32 and of the dynamic path; with fewer, fc2 stays dynamic."""
    from vitkit.models import quantize

    n = quantize.STATIC_MIN_IMAGES
    cal, x = images[:n], images[n:]
    static = vitkit.optimize(model, precision="int8", calibration=cal)
    dynamic = vitkit.optimize(model, precision="int8", calibration=cal[:n - 1])
    plan = static.int8_plan
    assert plan.to_dict()["fc2_input"] == "static" and len(plan.fc2_ranges) == len(model.blocks)
    assert dynamic.int8_plan.fc2_ranges is None and dynamic.int8_plan.to_dict()["fc2_input"] == "dynamic"
    for rng, blk in zip(plan.fc2_ranges, static._blocks):
        assert rng[0] <= 0.0 < rng[1]
        if not fast_mod.int8_fused_available():
            assert blk.fc1.out_qparams is None
        elif blk.layers["fc1"] == blk.layers["fc2"] == "int8":
            assert blk.fc1.out_qparams == quantize.static_qparams(*rng)
    assert all(b.fc1.out_qparams is None for b in dynamic._blocks if hasattr(b.fc1, "out_qparams"))
    want, _ = _plain(model, x)
    got_s, got_d = static(x), dynamic(x)
    assert agreement(got_s, want, logits=True)["rel"] <= TOLERANCES["int8"].rel
    assert agreement(got_s, got_d, logits=True)["rel"] <= TOLERANCES["int8"].rel
    # another model's plan (other depth) is refused in one line, and the wrapper keeps its own
    import copy

    short = copy.deepcopy(plan)
    short.fc2_ranges = short.fc2_ranges[:-1]
    with pytest.raises(ConfigError, match="the int8 plan has .* blocks.*calibrate this model"):
        static.use_int8_plan(short)
    assert static.int8_plan is plan


def test_layer_errors_measure_fc2_over_its_static_range():
    """fc2's int8 error is measured with the range it will run with: a static range wider than a batch's own makes
    coarser steps, and a larger measured error, than the batch's dynamic range."""
    from vitkit.models import quantize

    m = _outlier_model()
    x = torch.randn(8, 1, 28, 28, generator=torch.Generator().manual_seed(3))
    own = quantize.fc2_input_ranges(m, x)
    wide = [(lo * 4, hi * 4) for lo, hi in own]
    e_dyn = quantize.layer_errors(m, x)
    e_own = quantize.layer_errors(m, x, fc2_ranges=own)
    e_wide = quantize.layer_errors(m, x, fc2_ranges=wide)
    for d, o, w in zip(e_dyn, e_own, e_wide):
        assert o["fc2"] == pytest.approx(d["fc2"], rel=1e-4)  # its own range over all 8 images: the same steps
        assert w["fc2"] > 2 * d["fc2"]
        assert w["qkv"] == d["qkv"] and w["fc1"] == d["fc1"]  # only fc2 reads a static range


@pytest.mark.parametrize("bf16_faster", [True, False])
def test_linears_kept_out_of_int8_run_in_the_faster_higher_precision(monkeypatch, bf16_faster):
    """A linear calibration keeps out of int8 runs in bf16 only where bf16 is native and measured faster than fp32
    here (the measurement is replaced, so both outcomes run on any CPU); in fp32 otherwise."""
    measured = []
    monkeypatch.setattr(fast_mod, "bf16_native", lambda device: True)
    monkeypatch.setattr(fast_mod, "_bf16_linear_faster", lambda *shape: measured.append(shape) or bf16_faster)
    m = _outlier_model(fc2_outlier=True)
    cal = torch.randn(32, 1, 28, 28, generator=torch.Generator().manual_seed(1))
    fast = vitkit.optimize(m, precision="int8", calibration=cal)
    want = "bf16" if bf16_faster else "fp32"
    assert fast.int8_plan.layers[0]["fc2"] == want and fast._blocks[0].layers["fc2"] == want
    tokens = m.patch_embed.num_patches + m.num_prefix_tokens
    fc2 = (4 * tokens, m.blocks[0].mlp.fc2.in_features, m.blocks[0].mlp.fc2.out_features)
    patches = (m.patch_embed.num_patches, 2 * m.patch_embed.proj.weight[0].numel(), m.embed_dim)  # `_PatchLinear`
    assert set(measured) == {fc2, patches}  # (the real measurement is cached per shape: made once each)
    n = len(measured)
    monkeypatch.setattr(fast_mod, "bf16_native", lambda device: False)
    assert fast_mod.kept_precision(torch.device("cpu"), 8, 16, 16) == "fp32"  # no native bf16: never measured
    assert len(measured) == n


def test_the_bf16_linear_measurement_is_made_once_per_shape(caplog):
    fast_mod._bf16_linear_faster.cache_clear()
    with caplog.at_level(logging.INFO, logger="vitkit.models.fast"):
        first = fast_mod._bf16_linear_faster(24, 32, 16)
        assert fast_mod._bf16_linear_faster(24, 32, 16) == first and isinstance(first, bool)
    lines = [r.getMessage() for r in caplog.records if "at 24x32x16" in r.getMessage()]
    assert len(lines) == 1 and lines[0].endswith("bf16" if first else "fp32")


def test_int8_calibrates_on_its_first_batch_when_asked(model, images, digits_model):
    """calibration="first": int8 calibrates on the first batch it is given (what `vitkit eval/predict --precision
    int8` do, as auto's candidate always did), once; a bad value is refused in one line."""
    from vitkit.tasks.classify import load_classifier

    fast = vitkit.optimize(model, precision="int8", calibration="first")
    if fast.backend != "onednn" or fast.precision != "int8":
        pytest.skip("int8 runs on the oneDNN path only (x86 PyTorch builds)")
    assert fast.int8_plan is None
    fast(images)
    plan = fast.int8_plan
    assert plan is not None and plan.images == len(images) and plan.fc2_ranges is not None  # 64 >= 32: static
    fast(images[:8])
    assert fast.int8_plan is plan  # once
    clf, _ = load_classifier(digits_model, fast=True, precision="int8")
    clf(images[:40])
    assert clf.int8_plan is not None and clf.int8_plan.images == 40
    assert fast_mod.precision_record(clf)["precision_int8"]["fc2_input"] == "static"
    assert vitkit.optimize(model, precision="fp32", calibration="first")._calibrate_first is False
    with pytest.raises(ConfigError, match="calibration must be a .* or 'first'"):
        vitkit.optimize(model, precision="int8", calibration="last")


def test_bf16_patch_embedding_is_the_convolution_in_bf16(model, images, monkeypatch):
    """The bf16 path embeds patches by one bf16 matmul over the image's patches (`_PatchLinear`), its weight split
    into two bf16 terms: on pixels that bf16 holds exactly the tokens are the convolution's to ~1e-5 (a bf16 weight
    alone would be off by ~2^-9), on any pixels to their bf16 rounding; used by every forward; fp32 keeps the
    convolution. Where bf16 is not native here it is forced (the emulated bf16 is slow but computes the same)."""
    monkeypatch.setattr(fast_mod, "bf16_native", lambda device: True)
    monkeypatch.setattr(prec, "bf16_native", lambda device: True)
    fast = vitkit.optimize(model, precision="bf16")
    patch = fast._patch["bf16"]
    assert isinstance(patch, fast_mod._PatchLinear)
    x = images[:4]
    exact = x.bfloat16().float()
    with torch.inference_mode():
        want, got = model.patch_embed(x), patch(x)
        want_exact, got_exact = model.patch_embed(exact), patch(exact)
    assert got.shape == want.shape and got.dtype == torch.float32
    assert (got - want).norm() <= 2 ** -7 * want.norm()
    if patch.mod is not None:  # the brgemm linear writes fp32 tokens
        assert (got_exact - want_exact).norm() <= 1e-5 * want_exact.norm()
    with torch.inference_mode():  # the first block's input: its prefix tokens and position embeddings as the model's
        assert torch.equal(patch.tokens(x, fast.model), fast.model._pos_embed(patch(x)))
    calls = []
    real = fast_mod._PatchLinear.__call__
    monkeypatch.setattr(fast_mod._PatchLinear, "__call__", lambda self, *a: calls.append(1) or real(self, *a))
    fast(x)
    assert calls == [1]
    assert vitkit.optimize(model, precision="fp32")._patch.get("fp32") is None
    with pytest.raises(ConfigError, match="not a multiple of the patch size"):  # the model's own input check
        fast(torch.randn(1, 1, 30, 30))


def test_patch_embedding_keeps_the_convolution_where_it_is_not_plain():
    """A conv stem or padded odd image sizes keep the model's own patch embedding."""
    from vitkit.models import create_model

    assert fast_mod._PatchLinear.fits(create_model("vit_mini_patch4_28").patch_embed)
    assert not fast_mod._PatchLinear.fits(create_model("vit_mini_patch4_28", dynamic_img_pad=True).patch_embed)
    assert not fast_mod._PatchLinear.fits(create_model("vit_mini_patch4_28", stem="conv").patch_embed)


@pytest.mark.parametrize("kept", ["bf16", "fp32"])
def test_int8_embeds_patches_in_bf16_only_where_bf16_measured_faster(monkeypatch, kept):
    """The image's pixels are never quantised to int8: the int8 path embeds patches in bf16 where `kept_precision`
    (bf16 native and measured faster than fp32 at that shape) says so, else by the model's fp32 convolution."""
    shapes = []
    monkeypatch.setattr(fast_mod, "bf16_native", lambda device: True)
    monkeypatch.setattr(fast_mod, "kept_precision", lambda device, *shape: shapes.append(shape) or kept)
    m = _outlier_model()
    fast = vitkit.optimize(m, precision="int8")
    assert isinstance(fast._patch["int8"], fast_mod._PatchLinear) == (kept == "bf16")
    assert shapes == [(m.patch_embed.num_patches, 2 * 16, m.embed_dim)]  # the weight's two bf16 terms
    assert fast(torch.randn(2, 1, 28, 28)).shape == (2, 10)


def test_reduced_precision_blocks_norm_on_the_kernel_in_the_dtype_their_linear_reads(model, images):
    """bf16 and int8 blocks run their LayerNorms on vitkit's kernel, writing bf16 for a bf16 linear and fp32 for an
    int8 one; fp32 keeps nn.LayerNorm (unchanged numerics)."""
    from vitkit.models import kernels

    if kernels.cpu_attention() is None:
        pytest.skip("vitkit's kernel is off here")
    plain = vitkit.optimize(model, precision="fp32")._blocks[0]
    assert isinstance(plain.norm1, torch.nn.LayerNorm)
    blk = fast_mod._PackedBlock(model.blocks[0], kernels.cpu_attention(), "int8", {"qkv": "bf16", "fc1": "int8"})
    assert blk.norm1.out_bf16 and not blk.norm2.out_bf16
    x = images[:2]
    with torch.inference_mode():
        t = model.embed(x).reshape(-1, model.embed_dim)
        for ours, theirs in ((blk.norm1, model.blocks[0].norm1), (blk.norm2, model.blocks[0].norm2)):
            want, got = theirs(t), ours(t)
            assert got.dtype == (torch.bfloat16 if ours.out_bf16 else torch.float32)
            assert (got.float() - want).abs().max() <= 2 ** -8 * want.abs().max()
