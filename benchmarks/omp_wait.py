"""How PyTorch's OpenMP threads wait between kernels, and what it costs a training step: passive waiting
(`OMP_WAIT_POLICY=PASSIVE`, vitkit's default until stop 27) against short spins (`GOMP_SPINCOUNT`, vitkit's default
now 10,000, 3,000 in stops 27-33) and libgomp's own default (a 300,000 spin), on the planner's 32-px CIFAR model (width 64, depth 4,
stem 16-32-64), eager and `torch.compile`d.

The setting is read when torch loads OpenMP, so each candidate runs in a fresh child process; the candidates take
turns (A, B, C, A, B, C, ...) so that a shared machine's drifts hit all alike, and each figure is the median over
the rounds of the child's median step. `--load N` runs N busy processes beside them (a machine shared with other
work, where long spins steal the cores). The last line is the ratio of vitkit's default to passive waiting.

    python benchmarks/omp_wait.py                 # eager and compiled, 3 rounds, the machine as it is
    python benchmarks/omp_wait.py --load 2        # the same with both cores busy with other work
    python benchmarks/omp_wait.py --quick         # one round, few steps, eager only (the test suite runs this)
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys

from common import ROOT, machine

# (label, environment) of each waiting policy; vitkit's default is what `import vitkit` sets (src/vitkit/__init__.py)
POLICIES = {
    "passive": {"OMP_WAIT_POLICY": "PASSIVE"},
    "spin 3000": {"GOMP_SPINCOUNT": "3000"},
    "spin 10000 (vitkit)": {"GOMP_SPINCOUNT": "10000"},
    "spin 30000": {"GOMP_SPINCOUNT": "30000"},
    "libgomp default": {"GOMP_SPINCOUNT": "300000"},
}
DEFAULT, BASE = "spin 10000 (vitkit)", "passive"

_CHILD = r"""
import json, sys
import torch
sys.path.insert(0, {src!r})
import vitkit
from vitkit.tasks.plan import stem_channels_for
from vitkit.train.probe import step_seconds
torch.manual_seed(0)
m = vitkit.create_model(img_size=32, patch_size=4, embed_dim=64, depth=4, num_heads=2, mlp_ratio=2.0, stem="conv",
                        stem_channels=stem_channels_for(32, 4, "conv", 64), global_pool="avg", class_token=False,
                        num_classes=10)
sec = step_seconds(m, ({batch}, 3, 32, 32), 10, steps={steps}, warmup=3, compile={compile})
print(json.dumps({{"img_s": {batch} / sec}}))
"""

_BUSY = "import time\nwhile True:\n    sum(i * i for i in range(10000))\n"


def child_img_s(env_extra: dict, compile: bool, batch: int, steps: int) -> float:
    """Images per second of the training step in a fresh process started with `env_extra` (no inherited setting)."""
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT", "KMP_BLOCKTIME")}
    env.update(env_extra)
    code = _CHILD.format(src=os.path.join(ROOT, "src"), compile=compile, batch=batch, steps=steps)
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=900)
    if out.returncode != 0:
        raise SystemExit(f"the child failed:\n{out.stderr[-2000:]}")
    return float(json.loads(out.stdout.strip().splitlines()[-1])["img_s"])


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--steps", type=int, default=20, help="measured steps per child (median)")
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--load", type=int, default=0, help="busy processes to run beside the candidates")
    p.add_argument("--eager-only", action="store_true")
    p.add_argument("--quick", action="store_true")
    args = p.parse_args(argv)
    if args.quick:
        args.rounds, args.steps, args.batch, args.eager_only = 1, 3, 16, True
    print(machine())
    busy = [subprocess.Popen([sys.executable, "-c", _BUSY]) for _ in range(args.load)]
    modes = [False] if args.eager_only else [False, True]
    res = {(pol, c): [] for c in modes for pol in POLICIES}
    try:
        for _ in range(args.rounds):
            for c in modes:
                for pol, env in POLICIES.items():
                    res[(pol, c)].append(child_img_s(env, c, args.batch, args.steps))
    finally:
        for b in busy:
            b.kill()
    rows = []
    print(f"batch {args.batch}, {args.rounds} rounds, {args.load} busy processes beside")
    print(f"{'waiting':22} {'mode':9} {'img/s (median)':>15}  rounds")
    for (pol, c), v in res.items():
        rows.append({"policy": pol, "compile": c, "img_s": statistics.median(v), "rounds": v})
        print(f"{pol:22} {'compiled' if c else 'eager':9} {statistics.median(v):15.0f}  "
              + ", ".join(f"{x:.0f}" for x in v))
    ratios = {("compiled" if c else "eager"): statistics.median(res[(DEFAULT, c)]) / statistics.median(res[(BASE, c)])
              for c in modes}
    print("ratio vitkit default (spin 10000) / passive: " + ", ".join(f"{k} {v:.2f}" for k, v in ratios.items()))
    return {"rows": rows, "ratios": ratios}


if __name__ == "__main__":
    main()
