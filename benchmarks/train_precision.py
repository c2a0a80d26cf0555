"""Training in bf16 autocast vs fp32 on the CPU: steps/s of the same model from the same weights, interleaved in one
process (medians), then the final accuracy of each after the same wall-clock budget (`vitkit train --precision
fp32|bf16 --time-budget T`, everything else planned alike), for the demo model and ViT-Ti/16.

    python benchmarks/train_precision.py                    # steps/s, then 4 budgeted runs of 3 minutes on mnist5k
    python benchmarks/train_precision.py --budget 5m --data folder:/data/cifar10
    python benchmarks/train_precision.py --quick            # seconds: proves the script works

The last line is the bf16/fp32 steps/s ratio of the demo model (> 1: bf16 trains faster here).
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
from pathlib import Path

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import ROOT, machine, table  # noqa: E402

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

import vitkit  # noqa: E402
from vitkit.models.precision import bf16_native  # noqa: E402

# the model `make demo` trains on mnist5k (what the planner picked there, from its run's config.json)
DEMO = dict(name="vit_mini_patch7_28", kw=dict(in_chans=1, num_classes=10, patch_size=4, embed_dim=64, depth=4,
                                               num_heads=2, mlp_ratio=2.0, global_pool="avg", class_token=False),
            batch=64)
TINY = dict(name="vit_tiny_patch16_224", kw=dict(num_classes=10), batch=32)


def step_fn(model, x, y, precision):
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, foreach=True)

    def step():
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16"):
            out = model(x)
        loss = F.cross_entropy(out.float(), y)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    return step


def steps_per_s(spec: dict, steps: int, warmup: int = 2) -> dict:
    """Training steps/s of fp32 and bf16 autocast, the same initial weights, in turns."""
    torch.manual_seed(0)
    base = vitkit.create_model(spec["name"], **spec["kw"]).train()
    c = base.config
    x = torch.randn(spec["batch"], c.in_chans, c.img_size, c.img_size)
    y = torch.randint(0, c.num_classes, (spec["batch"],))
    import copy

    runs = {p: step_fn(copy.deepcopy(base), x, y, p) for p in ("fp32", "bf16")}
    times = {p: [] for p in runs}
    for i in range(warmup + steps):
        for p in (list(runs) if i % 2 == 0 else list(reversed(runs))):
            t = time.perf_counter()
            runs[p]()
            if i >= warmup:
                times[p].append(time.perf_counter() - t)
    return {p: 1.0 / statistics.median(v) for p, v in times.items()}


def budget_run(data: str, budget: str, precision: str, model, out: Path) -> dict:
    """`vitkit train` with this precision and budget (the rest planned); its held-out top-1 and plan."""
    name = f"{precision}-{model or 'planned'}"
    cmd = [sys.executable, "-m", "vitkit", "train", "--data", data, "--time-budget", budget, "--precision", precision,
           "--name", name, "--runs-dir", str(out), "--quiet"]
    if model:
        cmd += ["--model", model]
    env = dict(os.environ, PYTHONPATH=os.path.join(ROOT, "src"), OMP_WAIT_POLICY="PASSIVE")
    t0 = time.perf_counter()
    p = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if p.returncode:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{p.stderr[-2000:]}")
    report = json.loads((out / name / "report.json").read_text())
    cfg = json.loads((out / name / "config.json").read_text())
    ev = report.get("eval") or {}
    m = cfg["model"]
    desc = f"{model or 'planned'} (width {m['embed_dim']}, depth {m['depth']}, patch {m['patch_size']})"
    return dict(precision=cfg["train"]["precision"], model=desc, top1=ev.get("top1"),
                epochs=report.get("epochs"), steps=report.get("steps"), seconds=time.perf_counter() - t0)


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=20, help="timed training steps per precision")
    p.add_argument("--data", default="mnist5k", help="the data of the budgeted runs")
    p.add_argument("--budget", default="3m", help="the budget of each run ('none' to skip the runs)")
    p.add_argument("--json", help="also write the figures here")
    p.add_argument("--quick", action="store_true", help="tiny steps and 8 s runs of the demo model only")
    a = p.parse_args(argv)
    specs = [DEMO, TINY]
    if a.quick:
        specs, a.steps, a.budget = [dict(DEMO, batch=8)], 2, "8s"
    print(f"# train_precision.py on {machine()}; native bf16: {bf16_native(torch.device('cpu'))}", flush=True)
    rows, speed = [], {}
    for spec in specs:
        sps = steps_per_s(spec, a.steps)
        speed[spec["name"]] = sps
        rows.append([spec["name"], spec["batch"], f"{sps['fp32']:.2f}", f"{sps['bf16']:.2f}",
                     f"{sps['bf16'] / sps['fp32']:.2f}x"])
        print(" | ".join(str(c) for c in rows[-1]), flush=True)
    print(table(rows, ["model", "batch", "fp32 steps/s", "bf16 steps/s", "bf16 / fp32"]))
    runs = []
    if a.budget != "none":
        with tempfile.TemporaryDirectory() as d:
            for model in ([None] if a.quick else [None, TINY["name"]]):
                for prec in ("fp32", "bf16"):
                    r = budget_run(a.data, a.budget, prec, model, Path(d))
                    runs.append(r)
                    print(f"{a.data} {a.budget} {prec}: {r['model']}, {r['epochs']} epochs ({r['steps']} steps), "
                          f"top-1 {r['top1']:.2f}% in {r['seconds']:.0f} s", flush=True)
        print(table([[r["model"], r["precision"], r["epochs"], r["steps"], f"{r['top1']:.2f}"] for r in runs],
                    ["model", "precision", "epochs", "steps", "top-1 (%)"]))
    out = dict(machine=machine(), speed=speed, runs=runs)
    if a.json:
        Path(a.json).write_text(json.dumps(out, indent=1))
    d = speed[DEMO["name"]]
    print(f"ratio bf16/fp32 training steps/s, demo model: {d['bf16'] / d['fp32']:.2f}")
    return out


if __name__ == "__main__":
    main()
