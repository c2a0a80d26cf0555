"""The benchmarks' --quick modes, run once so the scripts cannot rot (the figures themselves are not judged here:
the quick shapes are too small for speed to mean anything)."""
import os
import sys

import pytest

pytest.importorskip("timm")
sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "..", "benchmarks"))


@pytest.mark.slow
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="peak memory is read from /proc (Linux)")
def test_benchmarks_quick(capsys):
    import highres
    import infer
    import train

    out = infer.main(["--quick"])
    assert [r[:2] for r in out["eager_ratios"]] == [("vit_tiny_patch16_224", 2)] and min(out["eager_ratios"][0][2:]) > 0
    labels = [r["label"] for r in out["results"]]
    assert labels[:2] == ["vitkit eager", "timm eager"] and any(l.startswith("ToMe r=2") for l in labels)
    assert all(r["items_per_s"] > 0 for r in out["results"]) and out["results"][0]["gflops"] > 0
    assert out["tome"]["r=2"]["speedup_vs_plain"] > 0
    assert capsys.readouterr().out.strip().splitlines()[-1].startswith("ratio vitkit/timm")

    out = train.main(["--quick"])
    assert [(r["lib"], r["ckpt"]) for r in out["rows"]] == [("vitkit", False), ("timm", False), ("vitkit", True),
                                                            ("timm", True)]
    assert all(r["items_per_s"] > 0 and r["peak_bytes"] > 0 for r in out["rows"])
    assert capsys.readouterr().out.strip().splitlines()[-1].startswith("ratio vitkit/timm")

    out = highres.main(["--quick"])
    assert [r["img"] for r in out["infer"]] == [64, 64, 192, 192]
    # inference memory grows with the token count, and checkpointing stores less than plain backprop
    peak = {(r["img"], r["lib"]): r["peak_bytes"] for r in out["infer"]}
    assert peak[(192, "vitkit")] > peak[(64, "vitkit")]
    assert out["train"]["ckpt_bytes"] < out["train"]["plain_bytes"]
    assert capsys.readouterr().out.strip().splitlines()[-1].startswith("ratio vitkit/timm")


def test_gpu_benchmark_runs_or_says_why_not(capsys):
    import torch

    import gpu

    if torch.cuda.is_available():
        pytest.skip("a GPU is here: run benchmarks/gpu.py itself (minutes), not from the test suite")
    assert gpu.main([]) == 0
    assert capsys.readouterr().out.startswith("SKIPPED: no CUDA device")
    assert gpu.peak_tflops("NVIDIA H100 80GB HBM3") == 989.0 and gpu.peak_tflops("NVIDIA H100 PCIe") == 756.0
    assert gpu.peak_tflops("NVIDIA H200") == 989.0 and gpu.peak_tflops("mystery card") == 0.0
