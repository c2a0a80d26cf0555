"""vitkit.optimize: the compiled path gives the plain outputs (fp32, <= 1e-4), pads short batches instead of
recompiling, leaves the caller's model alone, and carries token merging."""
import pytest
import torch

import vitkit
from vitkit.models import create_model
from vitkit.models.tome import apply_tome


def _model():
    return create_model("vit_mini_patch4_28", depth=2).eval()


@pytest.mark.slow
def test_compiled_equals_eager_and_pads_short_batches():
    m = _model()
    x = torch.randn(4, 1, 28, 28)
    with torch.no_grad():
        plain, feats = m(x), m.forward_head(m.forward_features(x), pre_logits=True)
    fast = vitkit.optimize(m)
    assert (fast(x) - plain).abs().max().item() <= 1e-4
    assert fast.compiled, "torch.compile fell back to eager on this machine"
    # a shorter batch is padded to the compiled size, not recompiled, and gives the same rows
    assert (fast(x[:3]) - plain[:3]).abs().max().item() <= 1e-4
    assert fast._sizes["forward"] == {4}
    assert (fast.embed_images(x) - feats).abs().max().item() <= 1e-4
    assert fast.num_classes == m.num_classes and fast.config is not None  # the model's attributes pass through
    # the caller's model is untouched: still trainable, still in its own class
    assert all(p.requires_grad for p in m.parameters()) and type(m) is type(create_model("vit_mini_patch4_28"))


def test_eager_fast_path_and_tome():
    m = _model()
    x = torch.randn(3, 1, 28, 28)
    with torch.no_grad():
        plain = m(x)
        merged = apply_tome(_model().eval(), 5)
        merged.load_state_dict(m.state_dict())
        expected = merged(x)
    eager = vitkit.optimize(m, compile=False)
    eager.train()  # inference only: stays in eval mode
    assert not eager.training and not eager.model.training
    assert torch.equal(eager(x), plain)
    assert torch.equal(vitkit.optimize(m, tome_r=0, compile=False)(x), plain)
    fast = vitkit.optimize(m, tome_r=5, compile=False)
    assert torch.equal(fast(x), expected) and not torch.equal(fast(x), plain)
    assert type(m).__name__ == "VisionTransformer"
    with pytest.raises(TypeError):
        vitkit.optimize(torch.nn.Linear(2, 2))
