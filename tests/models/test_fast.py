"""vitkit.optimize: every backend gives the plain outputs (fp32, <= 1e-4), token merging carries over, the oneDNN path
skips only work whose result is never read, the compiled path really freezes and pads short batches, and the
caller's model is left alone."""
import sys

import pytest
import torch
from _reference import check_reference, randomize_

import vitkit
from vitkit.models import create_model
from vitkit.models import fast as fast_mod
from vitkit.models.deit import VisionTransformerDistilled
from vitkit.models.tome import apply_tome

ONEDNN, WHY = fast_mod.onednn_supported(create_model("vit_mini_patch4_28", depth=1).eval())
needs_onednn = pytest.mark.skipif(not ONEDNN, reason=f"oneDNN backend unavailable: {WHY}")

VARIANTS = {
    "token": {},
    "avg": dict(global_pool="avg"),
    "registers+layerscale+qknorm": dict(reg_tokens=2, init_values=0.1, qk_norm=True),
    "no-qkv-bias+no-embed-class": dict(qkv_bias=False, no_embed_class=True, reg_tokens=1),
    "no-head": dict(num_classes=0),
}


def _model(**kw):
    # trained-like weights (spread LayerNorms, non-zero biases, peaked attention), so a wrong fusion or a skipped
    # term shows
    return randomize_(create_model("vit_mini_patch4_28", depth=2, **kw).eval())


def _reference(m, x):
    with torch.no_grad():
        feats = m.forward_features(x)
        return m(x), feats, m.forward_head(feats, pre_logits=True)


def _max_diffs(fast, m, x):
    ref = _reference(m, x)
    got = fast(x), fast.forward_features(x), fast.embed_images(x)
    return [(a - b).abs().max().item() for a, b in zip(got, ref)]


@needs_onednn
@pytest.mark.parametrize("variant", list(VARIANTS))
def test_onednn_backend_matches_eager(variant):
    m = _model(**VARIANTS[variant])
    x = torch.randn(3, 1, 28, 28)
    check_reference(m, x)
    fast = vitkit.optimize(m)
    assert fast.backend == "onednn" and not fast.compiled
    assert max(_max_diffs(fast, m, x)) <= 1e-4
    # any batch size, no recompiling, and a batch of one
    assert (fast(x[:1]) - _reference(m, x[:1])[0]).abs().max().item() <= 1e-4


@needs_onednn
@pytest.mark.parametrize("pool", ["token", "avg"])
def test_onednn_backend_carries_token_merging(pool):
    m = _model(global_pool=pool)
    x = torch.randn(3, 1, 28, 28)
    merged = apply_tome(_model(global_pool=pool), 5)
    with torch.no_grad():
        expected, plain = merged(x), m(x)
    fast = vitkit.optimize(m, tome_r=5)
    assert fast.backend == "onednn"
    assert (fast(x) - expected).abs().max().item() <= 1e-4
    assert (fast(x) - plain).abs().max().item() > 1e-3  # it did merge
    assert (vitkit.optimize(m, tome_r=0)(x) - plain).abs().max().item() <= 1e-4
    with torch.no_grad():
        assert (fast.forward_features(x) - merged.forward_features(x)).abs().max().item() <= 1e-4


@needs_onednn
def test_onednn_backend_runs_a_distilled_model():
    m = randomize_(VisionTransformerDistilled(img_size=28, patch_size=4, in_chans=1, num_classes=10, embed_dim=64,
                                              depth=2, num_heads=2, reg_tokens=1).eval())
    x = torch.randn(2, 1, 28, 28)
    check_reference(m, x)
    fast = vitkit.optimize(m)
    assert fast.backend == "onednn"
    with torch.no_grad():
        assert (fast(x) - m(x)).abs().max().item() <= 1e-4


@needs_onednn
def test_last_block_computes_the_prefix_tokens_only_when_nothing_else_is_read(monkeypatch):
    rows = []
    real = fast_mod._PackedLinear.__call__
    monkeypatch.setattr(fast_mod._PackedLinear, "__call__", lambda self, x: rows.append(x.shape[0]) or real(self, x))
    m = _model(reg_tokens=2)  # 3 prefix tokens (class + 2 registers), 49 patches
    x = torch.randn(4, 1, 28, 28)
    fast = vitkit.optimize(m)
    fast(x)
    # per block: qkv (or q and kv), fc1. Block 1 sees every token; block 2 computes keys/values for every token
    # but queries and the MLP for the 3 prefix tokens only
    assert rows == [4 * 52, 4 * 52, 4 * 52, 4 * 3, 4 * 3]
    rows.clear()
    fast.forward_features(x)  # every token is read: nothing skipped
    assert rows == [4 * 52] * 4
    rows.clear()
    vitkit.optimize(_model(global_pool="avg"))(x)  # the mean reads every token: nothing skipped
    assert rows == [4 * 50] * 4


def test_eager_backend_and_the_callers_model_is_untouched():
    m = _model()
    x = torch.randn(3, 1, 28, 28)
    with torch.no_grad():
        plain = m(x)
    eager = vitkit.optimize(m, backend="eager")
    eager.train()  # inference only: stays in eval mode
    assert not eager.training and not eager.model.training
    assert eager.backend == "eager" and torch.equal(eager(x), plain)
    assert eager.num_classes == m.num_classes and eager.config is not None  # the model's attributes pass through
    merged = apply_tome(_model(), 5)
    with torch.no_grad():
        assert torch.equal(vitkit.optimize(m, tome_r=5, backend="eager")(x), merged(x))
    assert all(p.requires_grad for p in m.parameters()) and type(m).__name__ == "VisionTransformer"


def test_bad_arguments():
    with pytest.raises(TypeError, match="VisionTransformer"):
        vitkit.optimize(torch.nn.Linear(2, 2))
    with pytest.raises(ValueError, match="backend must be one of"):
        vitkit.optimize(_model(), backend="tensorrt")
    with pytest.raises(ValueError, match="onednn backend cannot run here: .*float64"):
        vitkit.optimize(_model().double(), backend="onednn")
    # a model the oneDNN path cannot take goes to the compiled path under "auto"
    assert vitkit.optimize(_model().double()).backend == "compile"


@needs_onednn
def test_a_cpu_optimized_model_refuses_to_move():
    fast = vitkit.optimize(_model())
    with pytest.raises(RuntimeError, match="move or cast the model first"):
        fast.double()


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt")
def test_tune_malloc_applies_on_linux():
    assert fast_mod.tune_malloc() is True
    assert fast_mod.tune_malloc() is True  # idempotent


@pytest.mark.slow
def test_compile_backend_freezes_equals_eager_and_pads_short_batches(monkeypatch):
    import torch._inductor.freezing as freezing

    kept = []
    real_freeze = freezing.freeze

    def spy(*args, **kwargs):
        out = real_freeze(*args, **kwargs)
        kept.append(len(out[1]))  # graph inputs left after freezing
        return out

    monkeypatch.setattr(freezing, "freeze", spy)
    m = _model()
    x = torch.randn(4, 1, 28, 28)
    plain, _, feats = _reference(m, x)
    fast = vitkit.optimize(m, backend="compile")
    assert (fast(x) - plain).abs().max().item() <= 1e-4
    assert fast.compiled, "torch.compile fell back to eager on this machine"
    # the weights became constants: only the images are left as an input (it was every parameter before the fix)
    assert kept and kept[0] == 1, kept
    # a shorter batch is padded to the compiled size, not recompiled, and gives the same rows
    assert (fast(x[:3]) - plain[:3]).abs().max().item() <= 1e-4
    assert fast._sizes["forward"] == {4}
    assert (fast.embed_images(x) - feats).abs().max().item() <= 1e-4


def test_a_gpu_model_compiles_with_cuda_graphs_and_copies_its_outputs_out(monkeypatch):
    """On a GPU the compile backend asks inductor for CUDA graphs ("reduce-overhead"), starts a graph step per call
    and copies each output out of the graph's pool (the next replay overwrites it); on the CPU it does neither.
    No GPU here: torch.compile is replaced by a recorder, so this checks vitkit's side up to the device."""
    modes, steps = [], []

    def fake_compile(fn, **kwargs):
        modes.append(kwargs.get("mode"))
        return fn

    monkeypatch.setattr(torch, "compile", fake_compile)
    monkeypatch.setattr(torch.compiler, "cudagraph_mark_step_begin", lambda: steps.append(1))
    buf = torch.zeros(2, 3)

    def fn(x):  # like a graph's output: the same buffer every call
        return buf.copy_(x)

    run = fast_mod.compile_frozen(fn, cuda_graphs=True)
    a = run(torch.ones(2, 3))
    b = run(torch.full((2, 3), 2.0))
    assert modes == ["reduce-overhead"] and len(steps) == 2
    assert a.data_ptr() != buf.data_ptr() and torch.equal(a, torch.ones(2, 3)) and torch.equal(b, buf)
    cpu = fast_mod.compile_frozen(fn)
    assert modes[-1] is None and cpu(torch.ones(2, 3)).data_ptr() == buf.data_ptr() and len(steps) == 2
    # the wrapper picks CUDA graphs by the input's device
    seen = []
    monkeypatch.setattr(fast_mod, "compile_frozen", lambda fn, cuda_graphs=False: seen.append(cuda_graphs) or fn)
    m = vitkit.optimize(_model(), backend="compile")
    m(torch.randn(2, 1, 28, 28))
    assert seen == [False]
