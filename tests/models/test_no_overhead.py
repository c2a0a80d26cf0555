"""No overhead of ours: the eager forward runs exactly the ATen ops timm's does, as many times (profiler op
counts), so any speed difference between the two is noise (benchmarks/infer.py measures the speed itself)."""
import pytest
import torch
from torch.profiler import profile

from vitkit.models import create_model

timm = pytest.importorskip("timm")


def _op_counts(model, x):
    with torch.inference_mode():
        model(x)
        with profile() as p:
            model(x)
    return {e.key: e.count for e in p.key_averages() if e.key.startswith("aten::")}


def test_same_aten_ops_as_timm():
    ref = timm.create_model("vit_tiny_patch16_224", pretrained=False).eval()
    ours = create_model("vit_tiny_patch16_224").eval()
    x = torch.randn(2, 3, 224, 224)
    a, b = _op_counts(ref, x), _op_counts(ours, x)
    heavy = ("aten::addmm", "aten::_scaled_dot_product_flash_attention_for_cpu", "aten::gelu",
             "aten::native_layer_norm", "aten::add", "aten::copy_", "aten::cat", "aten::mkldnn_convolution")
    for op in heavy:  # every op that touches the activations
        assert b.get(op, 0) == a.get(op, 0), (op, b.get(op), a.get(op))
    assert sum(b.values()) <= sum(a.values()) + 5, (sum(b.values()), sum(a.values()))  # views etc.: no more
