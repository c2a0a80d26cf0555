"""torchrun with 2 CPU processes (gloo) ends with the same weights as 1 process with the same global batch, each
process training on its own half of every global batch."""
import json
import os
import subprocess
import sys
import textwrap

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


# Run under torchrun: vitkit's Trainer on 96 blank images whose first pixel holds the sample's index (no transform,
# so the batch carries it as index / 255); each rank writes the indices of every batch it trained on.
RECORD = textwrap.dedent("""
    import json, os, sys
    import torch
    import torch.nn.functional as F
    import vitkit
    from vitkit.data import InMemoryDataset
    from vitkit.train import Trainer, TrainConfig

    images = torch.zeros(96, 1, 28, 28, dtype=torch.uint8)
    images[:, 0, 0, 0] = torch.arange(96)
    data = InMemoryDataset(images, torch.arange(96) % 10)
    seen = []

    def loss_fn(net, batch):
        x, y = batch
        seen.append((x[:, 0, 0, 0] * 255).round().long().tolist())
        return F.cross_entropy(net(x), y), {}

    model = vitkit.create_model("vit_mini_patch7_28", embed_dim=16, depth=1, num_heads=2)
    cfg = TrainConfig(name="shards", runs_dir=sys.argv[1], epochs=2, batch_size=32, quiet=True, seed=3)
    Trainer(model, data, cfg, loss_fn).fit()
    with open(os.path.join(sys.argv[1], "seen%s.json" % os.environ["RANK"]), "w") as f:
        json.dump(seen, f)
""")


@pytest.mark.slow
@pytest.mark.timeout(180)
def test_each_process_trains_on_its_own_half_of_every_global_batch(tmp_path):
    """Under torchrun, rank 0 and rank 1 see disjoint halves of each global batch, and together exactly the batch
    one process would see at that step (so every sample once an epoch): a run where each rank trained on the whole
    batch would still match one process's weights, but not this."""
    from vitkit.data import InMemoryDataset, make_loader

    script = tmp_path / "record.py"
    script.write_text(RECORD)
    env = dict(os.environ, OMP_NUM_THREADS="1", OMP_WAIT_POLICY="PASSIVE")
    src = os.path.join(os.path.dirname(__file__), "..", "..", "src")
    env["PYTHONPATH"] = os.path.abspath(src) + os.pathsep + env.get("PYTHONPATH", "")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", str(script),
           str(tmp_path)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=170)
    assert proc.returncode == 0, proc.stderr[-3000:]
    ranks = [json.loads((tmp_path / f"seen{r}.json").read_text()) for r in (0, 1)]
    images = torch.zeros(96, 1, 28, 28, dtype=torch.uint8)
    images[:, 0, 0, 0] = torch.arange(96)
    data = InMemoryDataset(images, torch.arange(96) % 10)
    expected = [(x[:, 0, 0, 0] * 255).round().long().tolist() for epoch in range(2)
                for x, _ in make_loader(data, 32, train=True, seed=3, epoch=epoch)]
    assert len(expected) == 6 and len(ranks[0]) == len(ranks[1]) == 6
    for a, b, batch in zip(*ranks, expected):
        assert len(a) == len(b) == 16 and not set(a) & set(b), (a, b)
        assert sorted(a + b) == sorted(batch)
    for epoch in range(2):
        assert sorted(i for r in ranks for batch in r[3 * epoch: 3 * epoch + 3] for i in batch) == list(range(96))
