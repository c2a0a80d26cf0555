"""torchrun with 2 CPU processes (gloo) ends with the same weights as 1 process with the same global batch."""
import os
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from vitkit.cli import main

# A small lr: Adam moves a weight whose gradient is ~0 by up to ~lr per step, so float-rounding differences
# (two half-batch gradient means averaged vs one mean) can show up at the scale of lr, not of the rounding.
ARGS = ["train", "--data", "mnist5k", "--max-train", "256", "--max-val", "64", "--epochs", "2", "--batch-size", "64",
        "--model", "vit_mini_patch7_28", "--model-arg", "embed_dim=32", "--model-arg", "depth=2",
        "--model-arg", "num_heads=2", "--lr", "1e-4", "--quiet"]


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_two_gloo_processes_match_one(tmp_path):
    env = dict(os.environ, OMP_NUM_THREADS="1", OMP_WAIT_POLICY="PASSIVE")
    src = os.path.join(os.path.dirname(__file__), "..", "..", "src")
    env["PYTHONPATH"] = os.path.abspath(src) + os.pathsep + env.get("PYTHONPATH", "")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "vitkit",
           *ARGS, "--name", "ddp", "--runs-dir", str(tmp_path)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=280)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert main([*ARGS, "--name", "one", "--runs-dir", str(tmp_path)]) == 0
    a = load_file(str(tmp_path / "ddp" / "last.safetensors"))
    b = load_file(str(tmp_path / "one" / "last.safetensors"))
    diff = max((a[k] - b[k]).abs().max().item() for k in a)
    assert diff <= 1e-5, diff
    # ... and 1e-5 tells runs apart: stopping after half the steps leaves the weights far from there
    assert main([*ARGS, "--name", "short", "--runs-dir", str(tmp_path), "--max-steps", "4"]) == 0
    c = load_file(str(tmp_path / "short" / "last.safetensors"))
    assert max((c[k] - b[k]).abs().max().item() for k in c) > 10 * 1e-5
    cfg = (tmp_path / "ddp" / "config.json").read_text()
    assert '"world_size": 2' in cfg
    # rank 0 alone wrote: one set of files, no leftovers from a second writer
    assert not any(p.name.endswith(".tmp") for p in (tmp_path / "ddp").iterdir())
