"""A training process killed with SIGKILL mid-run leaves a loadable checkpoint, and --resume finishes the run."""
import json
import os
import subprocess
import sys
import time

import pytest
import torch
from safetensors.torch import load_file

import vitkit
from vitkit.cli import main
from vitkit.io.checkpoint import read_metadata
from vitkit.train import read_metrics
from _runs import kill9

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
    finally:
        kill9(proc)
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


# A tiny run (4 steps an epoch, 3 epochs, one thread) for the kill inside a write; every run is a fresh process
# with the same settings, so the resumed run can be held to the uninterrupted one bit for bit.
TINY = ["train", "--data", "mnist5k", "--max-train", "256", "--max-val", "64", "--epochs", "3", "--batch-size", "64",
        "--model", "vit_mini_patch7_28", "--model-arg", "embed_dim=32", "--model-arg", "depth=1",
        "--model-arg", "num_heads=2", "--quiet"]


def _vitkit(args, pause=None, wait=True):
    """`python -m vitkit ARGS` in a fresh process with one thread; `pause` sets VITKIT_TEST_PAUSE_WRITE."""
    env = dict(os.environ, OMP_NUM_THREADS="1")
    env.pop("VITKIT_TEST_PAUSE_WRITE", None)
    if pause:
        env["VITKIT_TEST_PAUSE_WRITE"] = pause
    src = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", "..", "src"))
    env["PYTHONPATH"] = src + os.pathsep + env.get("PYTHONPATH", "")
    proc = subprocess.Popen([sys.executable, "-m", "vitkit", *args], env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)
    if wait:
        _, err = proc.communicate(timeout=120)
        assert proc.returncode == 0, err[-3000:]
    return proc


@pytest.mark.slow
@pytest.mark.timeout(180)
def test_sigkill_inside_a_checkpoint_write_then_resume_is_bit_identical(tmp_path):
    """SIGKILL while the second epoch's last.state.pt is written (its temp file complete, not yet renamed: held
    there by the VITKIT_TEST_PAUSE_WRITE hook): the folder still loads, its last.safetensors (already epoch 2's) is
    newer than the training state (epoch 1's), and --resume, going by the state, ends with exactly the weights of
    an uninterrupted run."""
    _vitkit([*TINY, "--name", "full", "--runs-dir", str(tmp_path)])
    run = tmp_path / "cut"
    proc = _vitkit([*TINY, "--name", "cut", "--runs-dir", str(tmp_path)], pause="last.state.pt:3", wait=False)
    try:
        deadline = time.time() + 120
        while time.time() < deadline and proc.poll() is None:
            # the first save has landed (the file exists) and the next one sits in its temp file
            if (run / "last.state.pt").is_file() and list(run.glob(".last.state.pt.*.tmp")):
                break
            time.sleep(0.01)
        assert proc.poll() is None, "the run ended before it could be killed: " + proc.stderr.read()[-2000:]
        time.sleep(0.3)  # the temp file of a tiny model is written in milliseconds; now it waits for its rename
    finally:
        kill9(proc)
    assert list(run.glob(".last.state.pt.*.tmp")), "the kill should have landed inside the write"
    for f in ("last.safetensors", "best.safetensors"):
        model = vitkit.load(run / f)  # whole, though the process died inside a write
        assert all(torch.isfinite(p).all() for p in model.parameters())
    assert json.loads(read_metadata(run / "last.safetensors")["epoch"]) == 2
    assert torch.load(run / "last.state.pt", weights_only=True)["epoch"] == 1
    assert read_metrics(run / "metrics.csv")[-1]["epoch"] == 1
    _vitkit(["train", "--resume", str(run), "--quiet"])
    assert [r["epoch"] for r in read_metrics(run / "metrics.csv")] == [1, 2, 3]
    assert not list(run.glob(".*.tmp"))
    a, b = load_file(str(tmp_path / "full" / "last.safetensors")), load_file(str(run / "last.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
