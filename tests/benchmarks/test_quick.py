"""The benchmarks' --quick modes, run once so the scripts cannot rot: each runs and reports well-formed figures
(the right rows, positive speeds, the ratio line last). The figures themselves are not judged: speed and memory
depend on the machine and its load. What the benchmarks claim is checked by counting in tests/models/test_costs.py
(ToMe's FLOPs, the bytes checkpointing keeps)."""
import math
import os
import sys

import pytest

pytest.importorskip("timm")
sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "..", "benchmarks"))


def _last_line(capsys) -> str:
    return capsys.readouterr().out.strip().splitlines()[-1]


def _is_memory_figure(b) -> bool:
    """Bytes, or NaN where the kernel does not let the benchmark reset its high-water mark."""
    return isinstance(b, float) and (math.isnan(b) or b >= 0)


@pytest.mark.slow
def test_benchmarks_quick(capsys):
    import highres
    import infer
    import precision
    import train

    out = infer.main(["--quick"])
    assert [r[:2] for r in out["eager_ratios"]] == [("vit_tiny_patch16_224", 2)] and min(out["eager_ratios"][0][2:]) > 0
    labels = [r["label"] for r in out["results"]]
    assert labels[:2] == ["vitkit eager", "timm eager"] and any(l.startswith("ToMe r=2") for l in labels)
    assert all(r["items_per_s"] > 0 for r in out["results"]) and out["results"][0]["gflops"] > 0
    assert out["tome"]["r=2"]["speedup_vs_plain"] > 0
    assert _last_line(capsys).startswith("ratio vitkit/timm")

    out = train.main(["--quick"])
    assert [(r["lib"], r["ckpt"]) for r in out["rows"]] == [("vitkit", False), ("timm", False), ("vitkit", True),
                                                            ("timm", True)]
    assert all(r["items_per_s"] > 0 and _is_memory_figure(r["peak_bytes"]) for r in out["rows"])
    assert _last_line(capsys).startswith("ratio vitkit/timm")

    out = precision.main(["--quick"])
    paths = [r["path"] for r in out["results"]]
    assert paths[:2] == ["timm eager fp32", "vitkit fp32"] and "vitkit int8" in paths  # int8: every oneDNN build
    assert "vitkit int8-mixed" in paths  # calibrated int8, some fc2 in bf16
    assert all(r["img_s"] > 0 and r["of_matmul"] > 0 for r in out["results"])
    assert _last_line(capsys).startswith("ratio vit_tiny b2: vitkit ")

    out = highres.main(["--quick"])
    assert [(r["img"], r["lib"]) for r in out["infer"]] == [(64, "vitkit"), (64, "timm"), (192, "vitkit"),
                                                            (192, "timm")]
    assert all(r["items_per_s"] > 0 and r["gflops"] > 0 and _is_memory_figure(r["peak_bytes"]) for r in out["infer"])
    assert out["train"]["img"] == 96 and all(_is_memory_figure(out["train"][k]) for k in ("plain_bytes", "ckpt_bytes"))
    assert _last_line(capsys).startswith("ratio vitkit/timm")


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_scale_train_quick(capsys):
    """1 process vs 2 torchrun processes (DDP, FSDP) of vitkit's engine: three launches of a tiny model."""
    import scale_train

    out = scale_train.main(["--quick"])
    assert [(r["run"], r["processes"]) for r in out["rows"]] == [("1 process", 1), ("ddp", 2), ("fsdp", 2)]
    assert all(r["img_per_s"] > 0 for r in out["rows"]) and out["ratio_ddp"] > 0 and out["ratio_fsdp"] > 0
    assert _last_line(capsys).startswith("ratio ddp-2proc/1proc")


def test_gpu_benchmark_runs_or_says_why_not(capsys):
    import torch

    import gpu

    if torch.cuda.is_available():
        pytest.skip("a GPU is here: run benchmarks/gpu.py itself (minutes), not from the test suite")
    assert gpu.main([]) == 0
    assert capsys.readouterr().out.startswith("SKIPPED: no CUDA device")
    assert gpu.peak_tflops("NVIDIA H100 80GB HBM3") == 989.0 and gpu.peak_tflops("NVIDIA H100 PCIe") == 756.0
    assert gpu.peak_tflops("NVIDIA H200") == 989.0 and gpu.peak_tflops("mystery card") == 0.0


@pytest.mark.slow
def test_training_benchmarks_quick(capsys):
    """loader.py, train_budget.py and ablation.py in their --quick modes: well-formed rows and the ratio line last."""
    import ablation
    import loader
    import train_budget

    out = loader.main(["--quick"])
    assert all(v > 0 for v in out["rates"].values()) and out["ratio"] > 0 and len(out["rates"]) == 2
    assert _last_line(capsys).startswith("ratio data path / in memory: ")

    out = train_budget.main(["--quick", "--budget", "8s"])
    assert set(out) == {"vitkit", "timm"} and all(0 <= r["top1"] <= 100 and r["steps"] > 0 for r in out.values())
    assert out["vitkit"]["plan"] and out["vitkit"]["precision"] in ("fp32", "bf16")
    assert _last_line(capsys).startswith("ratio vitkit/timm top-1: ")

    out = ablation.main(["--quick", "--only", "patchify"])
    assert list(out) == ["base (conv stem, 128 wide, 6 deep)", "test-time flip averaging (the base model)",
                         "patchify stem instead of conv"]
    assert all(0 <= r["top1"] <= 100 and r["steps"] > 0 for r in out.values())
    assert _last_line(capsys).startswith("best option / base top-1 ratio: ")


def test_scale_benchmark_scan_quick(capsys):
    """benchmarks/scale.py --sections scan on a tiny generated folder: every candidate timed, the ratio line last."""
    import scale

    out = scale.main(["--quick", "--sections", "scan"])["scan"]
    assert set(out["seconds"]) == {"old serial scan", "first scan, threads", "first scan, processes", "cached rescan"}
    assert all(v > 0 for v in out["seconds"].values()) and out["ratio"] > 0 and out["ratio_cached"] > 0
    assert _last_line(capsys).startswith("ratio old serial scan / first scan: ")


def test_scale_benchmark_loader_quick(capsys):
    """benchmarks/scale.py --sections loader on a tiny generated folder: shards, the streamed folder and in-memory
    tensors each read a whole epoch at their worker counts, the ratio line last."""
    import scale

    out = scale.main(["--quick", "--sections", "loader"])["loader"]
    assert set(out["img_per_s"]) == {"shards, 1 worker", "shards, 2 workers", "folder streamed, 1 worker",
                                     "folder streamed, 2 workers", "in-memory tensors"}
    assert all(v > 0 for v in out["img_per_s"].values()) and out["ratio"] > 0 and out["ratio_memory"] > 0
    lines = capsys.readouterr().out.strip().splitlines()
    counts = {l.rsplit("(", 1)[1] for l in lines if "round 1:" in l}
    assert len(counts) == 1 and counts != {"0 images)"}  # every path read the same whole epoch
    assert lines[-1].startswith("ratio shards / folder streamed img/s at 2 workers: ")


@pytest.mark.slow
def test_train_precision_benchmark_quick(capsys):
    """train_precision.py --quick: steps/s of fp32 and bf16 autocast, and two budgeted `vitkit train` runs."""
    import train_precision

    out = train_precision.main(["--quick"])
    sps = out["speed"]["vit_mini_patch7_28"]
    assert set(sps) == {"fp32", "bf16"} and min(sps.values()) > 0
    assert [r["precision"] for r in out["runs"]] == ["fp32", "bf16"]
    assert all(0 <= r["top1"] <= 100 and r["steps"] > 0 for r in out["runs"])
    assert _last_line(capsys).startswith("ratio bf16/fp32 training steps/s")


@pytest.mark.slow
def test_omp_wait_quick(capsys):
    import omp_wait

    out = omp_wait.main(["--quick"])
    assert [r["policy"] for r in out["rows"]] == list(omp_wait.POLICIES) and not any(r["compile"] for r in out["rows"])
    assert all(r["img_s"] > 0 for r in out["rows"]) and set(out["ratios"]) == {"eager"}
    assert _last_line(capsys).startswith("ratio vitkit default (spin 10000) / passive: eager ")
