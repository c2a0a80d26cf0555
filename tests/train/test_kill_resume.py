"""A training process killed with SIGKILL mid-run leaves a loadable checkpoint, and --resume finishes the run."""
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

import vitkit
from vitkit.cli import main
from vitkit.train import read_metrics

ARGS = ["train", "--data", "mnist5k", "--max-train", "1024", "--max-val", "100", "--epochs", "10", "--batch-size",
        "32", "--model", "vit_mini_patch7_28", "--model-arg", "embed_dim=32", "--model-arg", "depth=2",
        "--model-arg", "num_heads=2", "--quiet"]


@pytest.mark.slow
@pytest.mark.timeout(240)
def test_sigkill_then_resume(tmp_path):
    env = dict(os.environ)
    src = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", "..", "src"))
    env["PYTHONPATH"] = src + os.pathsep + env.get("PYTHONPATH", "")
    proc = subprocess.Popen([sys.executable, "-m", "vitkit", *ARGS, "--name", "k", "--runs-dir", str(tmp_path)],
                            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    metrics = tmp_path / "k" / "metrics.csv"
    try:
        deadline = time.time() + 180
        while time.time() < deadline and proc.poll() is None:
            if metrics.is_file() and len(metrics.read_text().splitlines()) >= 3:  # header + 2 epochs
                break
            time.sleep(0.02)
        assert proc.poll() is None, "the run ended before it could be killed"
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    done = read_metrics(metrics)[-1]["epoch"]
    assert 2 <= done < 10
    model = vitkit.load(tmp_path / "k" / "last.safetensors")  # whole, whatever the moment of the kill
    assert all(torch.isfinite(p).all() for p in model.parameters())
    state = torch.load(tmp_path / "k" / "last.state.pt", weights_only=True)
    assert state["epoch"] >= done
    assert main(["train", "--resume", str(tmp_path / "k"), "--quiet"]) == 0
    rows = read_metrics(metrics)
    assert [r["epoch"] for r in rows] == list(range(1, 11))
    assert not any(p.name.endswith(".tmp") for p in (tmp_path / "k").iterdir())
