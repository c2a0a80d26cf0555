"""Training throughput in 1 process vs 2 processes on this machine: vitkit's engine (`Trainer`) on in-memory
tensors, one process using every core vs two torchrun processes of one thread each (gloo), with DDP and with FSDP
(`--strategy fsdp`, in the same launch as DDP, the order alternating). The launches alternate (1, 2, 1, 2, ...) so
drifts of a shared machine hit them alike; each reports its steady images/s (the steps after the first `warmup`),
and the medians are compared. The last line is the ratio of 2-process DDP to 1 process (> 1: two processes train
faster).

    python benchmarks/scale_train.py            # width 192, depth 6, 32 px patch 4 (64 tokens), global batch 64
    python benchmarks/scale_train.py --quick    # a tiny model, a few steps (the test suite runs this)

This is the `train` section meant for benchmarks/scale.py (`train_section`), kept in its own file on its branch.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SRC = os.path.join(ROOT, "src")
sys.path.insert(0, SRC)


def worker(a) -> None:
    """Training runs (under torchrun or alone), one per strategy in `a.strategy` (comma-separated), in this process
    group one after the other: each one's steady images/s into `a.out` (rank 0)."""
    import torch
    import torch.nn.functional as F

    import vitkit
    from vitkit.data import InMemoryDataset
    from vitkit.train import Trainer, TrainConfig

    speeds = {}
    for strategy in a.strategy.split(","):
        torch.manual_seed(0)
        n = a.batch * (a.steps + a.warmup)
        data = InMemoryDataset(torch.randint(0, 256, (n, 3, a.img, a.img), dtype=torch.uint8),
                               torch.arange(n) % 10)
        model = vitkit.create_model("vit_mini_patch7_28", img_size=a.img, patch_size=a.patch, in_chans=3,
                                    num_classes=10, embed_dim=a.dim, depth=a.depth, num_heads=max(1, a.dim // 64))
        stamps = []

        def loss_fn(net, batch):
            stamps.append(time.perf_counter())  # a step starts: the previous one has ended
            x, y = batch
            return F.cross_entropy(net(x), y), {}

        cfg = TrainConfig(name=strategy, runs_dir=a.runs, epochs=1, batch_size=a.batch, lr=1e-4, precision="fp32",
                          quiet=True, strategy=strategy, best_metric="")
        trainer = Trainer(model, data, cfg, loss_fn)
        trainer.fit()
        steady = stamps[a.warmup:]  # step warmup's start .. the last step's start
        speeds[strategy] = a.batch * (len(steady) - 1) / (steady[-1] - steady[0])
    if trainer.dist.is_main:
        with open(a.out, "w") as f:
            json.dump(speeds, f)


def _run(strategies: str, processes: int, a, cores: int) -> dict:
    """One launch: 1 process using every core, or 2 torchrun processes of half the cores each, training with each
    of `strategies` in turn; {strategy: images/s}."""
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "speed.json")
        flags = ["--worker", "--out", out, "--runs", tmp, "--strategy", strategies, "--batch", str(a.batch),
                 "--steps", str(a.steps), "--warmup", str(a.warmup), "--img", str(a.img), "--patch", str(a.patch),
                 "--dim", str(a.dim), "--depth", str(a.depth)]
        env = dict(os.environ, PYTHONPATH=SRC + os.pathsep + os.environ.get("PYTHONPATH", ""), VITKIT_DEVICE="cpu",
                   OMP_WAIT_POLICY="PASSIVE", OMP_NUM_THREADS=str(max(1, cores // processes)))
        cmd = [sys.executable, __file__, *flags]
        if processes > 1:
            cmd[1:2] = ["-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={processes}", __file__]
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900)
        if proc.returncode != 0:
            raise RuntimeError(f"{processes}-process run failed:\n{proc.stderr[-3000:]}")
        with open(out) as f:
            return json.load(f)


def train_section(a) -> dict:
    """1 process (all cores) vs 2 processes (DDP, FSDP: one launch, the two in alternating order), launches
    alternating; medians of images/s."""
    cores = os.cpu_count() or 2
    kinds = ["1 process", "ddp", "fsdp"]
    speeds = {k: [] for k in kinds}
    for rep in range(a.reps):
        speeds["1 process"].append(_run("ddp", 1, a, cores)["ddp"])
        for k, v in _run("ddp,fsdp" if rep % 2 == 0 else "fsdp,ddp", 2, a, cores).items():
            speeds[k].append(v)
    med = {k: statistics.median(v) for k, v in speeds.items()}
    rows = [{"run": k, "processes": 1 if k == "1 process" else 2,
             "threads_per_process": cores if k == "1 process" else max(1, cores // 2),
             "img_per_s": med[k], "runs": speeds[k]} for k in kinds]
    return {"rows": rows, "ratio_ddp": med["ddp"] / med["1 process"], "ratio_fsdp": med["fsdp"] / med["1 process"]}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true")
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--batch", type=int, default=64, help="global batch (split over the processes)")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--img", type=int, default=32)
    p.add_argument("--patch", type=int, default=4)
    p.add_argument("--dim", type=int, default=192)
    p.add_argument("--depth", type=int, default=6)
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--strategy", default="ddp", help=argparse.SUPPRESS)
    p.add_argument("--out", help=argparse.SUPPRESS)
    p.add_argument("--runs", help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a.worker:
        worker(a)
        return None
    if a.quick:
        a.reps, a.batch, a.steps, a.warmup, a.img, a.dim, a.depth = 1, 8, 3, 1, 16, 32, 1
    from common import machine

    print(f"# {machine()}")
    print(f"# ViT width {a.dim}, depth {a.depth}, {a.img} px patch {a.patch}; global batch {a.batch}; {a.steps} steps "
          f"after {a.warmup} warm-up; {a.reps} alternating launches each; medians")
    out = train_section(a)
    for r in out["rows"]:
        print(f"{r['run']:>10}: {r['processes']} x {r['threads_per_process']} thread(s)  {r['img_per_s']:8.1f} img/s")
    print(f"ratio fsdp-2proc/1proc {out['ratio_fsdp']:.2f}")
    print(f"ratio ddp-2proc/1proc {out['ratio_ddp']:.2f}")
    return out


if __name__ == "__main__":
    main()
