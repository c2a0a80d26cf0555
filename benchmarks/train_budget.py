"""Accuracy within a time budget: `vitkit train --data folder:PATH --time-budget T` (nothing else) against a plain
timm ViT training loop given the same data and the same wall-clock budget, one after the other in one run.

The timm loop is what a user would write: timm's ViT-Ti (width 192, depth 12, 3 heads) at the images' own size
with 8x8 or 7x7 patches, images decoded into memory once, random crops (+ flips for colour images) per batch,
AdamW (lr 1e-3, weight decay 0.05), label smoothing 0.1, warm-up then cosine laid over the budget from its
measured speed, fp32. Both are scored on the folder's held-out split (its test/ or val/ folder); the budget of
each covers everything from its start (decoding, planning, training, evaluation). The last line is the ratio of
the two top-1 figures.

    python benchmarks/train_budget.py --data folder:/data/cifar10 --budget 60m
    python benchmarks/train_budget.py --quick       # a generated folder, 40 s each (a smoke test)
"""
from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from common import ROOT, machine

import vitkit  # noqa: F401  (chooses how OpenMP threads wait before torch loads them)
from vitkit.train import parse_duration


def run_vitkit(data: str, budget: float, runs: Path, extra) -> dict:
    """The vitkit command line, exactly as a user runs it; its own summary (top-1 on the held-out split)."""
    env = dict(os.environ, PYTHONPATH=os.path.join(ROOT, "src") + os.pathsep + os.environ.get("PYTHONPATH", ""))
    cmd = [sys.executable, "-m", "vitkit", "train", "--data", data, "--time-budget", f"{budget}s", "--name", "vitkit",
           "--runs-dir", str(runs), "--overwrite", "--json", "--quiet", *extra]
    t = time.perf_counter()
    out = subprocess.run(cmd, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - t
    if out.returncode != 0:
        raise SystemExit(f"vitkit train failed:\n{out.stderr[-3000:]}")
    s = json.loads(out.stdout)
    cfg = json.loads((runs / "vitkit" / "config.json").read_text())
    return {"top1": s["eval"]["top1"], "wall_s": wall, "steps": s["steps"], "epochs": s["epochs"],
            "model": {k: cfg["model"][k] for k in ("embed_dim", "depth", "num_heads", "patch_size", "stem")},
            "precision": cfg["train"]["precision"], "plan": cfg["recipe"]["reasons"]}


def run_timm(data: str, budget: float, seed: int = 0) -> dict:
    """A plain timm ViT-Ti loop over the same budget (see the module docstring)."""
    import timm

    t0 = time.perf_counter()
    torch.manual_seed(seed)
    x_tr, y_tr, x_te, y_te, classes = _decode_plainly(Path(data[len("folder:"):]))
    c, side = x_tr.shape[1], x_tr.shape[-1]
    mean = (x_tr[:5000].float() / 255).mean((0, 2, 3)).view(1, -1, 1, 1)
    std = (x_tr[:5000].float() / 255).std((0, 2, 3)).view(1, -1, 1, 1)
    patch = 4 if side in (28, 32) else max(1, side // 8)
    model = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=side, patch_size=patch, in_chans=c,
                              num_classes=len(classes))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.05)
    bs, flips = 128, c == 3
    pad = side // 8

    def batch(idx, g):
        x = x_tr[idx].float() / 255
        x = F.pad(x, (pad, pad, pad, pad), mode="reflect")
        i, j = torch.randint(0, 2 * pad + 1, (2,), generator=g).tolist()
        x = x[..., i:i + side, j:j + side]
        if flips:
            f = torch.rand(len(idx), generator=g) < 0.5
            x[f] = x[f].flip(-1)
        return (x - mean) / std, y_tr[idx]

    def evaluate():
        model.eval()
        correct = 0
        with torch.no_grad():
            for i in range(0, len(x_te), 500):
                xv = (x_te[i:i + 500].float() / 255 - mean) / std
                correct += (model(xv).argmax(-1) == y_te[i:i + 500]).sum().item()
        model.train()
        return 100.0 * correct / len(x_te)

    g = torch.Generator().manual_seed(seed)
    step, total, warm = 0, None, 50
    t_train = time.perf_counter()
    eval_guess = None
    while total is None or step < total:
        order = torch.randperm(len(x_tr), generator=g)
        for k in range(len(x_tr) // bs):
            if total is not None and step >= total:
                break
            x, y = batch(order[k * bs:(k + 1) * bs], g)
            lr = 1e-3 * min(1.0, (step + 1) / warm) if total is None else \
                1e-5 + 0.5 * (1e-3 - 1e-5) * (1 + math.cos(math.pi * min(1.0, max(0, step - warm) / max(1, total - warm))))
            for group in opt.param_groups:
                group["lr"] = lr
            loss = F.cross_entropy(model(x), y, label_smoothing=0.1)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            step += 1
            if total is None and (step == 20 or time.perf_counter() - t_train > budget / 4):
                # lay the cosine over what is left, keeping time to evaluate (after a quarter of a short budget)
                per_step = (time.perf_counter() - t_train) / step
                eval_guess = len(x_te) * per_step / bs / 3 + 2
                left = budget - (time.perf_counter() - t0) - eval_guess
                total = step + max(0, int(left / per_step))
            if total is not None and time.perf_counter() - t0 + (eval_guess or 0) >= budget:
                total = step
                break
    top1 = evaluate()
    return {"top1": top1, "wall_s": time.perf_counter() - t0, "steps": step, "epochs": round(step * bs / len(x_tr), 1),
            "model": "timm vit_tiny (192 wide, 12 deep, 3 heads), patch %d, fp32" % patch}


def _decode_plainly(root: Path):
    """train/ and test/ (or val/) class folders decoded with Pillow into uint8 tensors, one file at a time."""
    import numpy as np
    from PIL import Image

    held = next((root / n for n in ("test", "val", "valid", "validation") if (root / n).is_dir()), None)
    if not (root / "train").is_dir() or held is None:
        raise SystemExit(f"{root} needs train/ and test/ (or val/) class folders for the timm side")
    classes = sorted(d.name for d in (root / "train").iterdir() if d.is_dir())
    out = []
    for split in (root / "train", held):
        xs, ys = [], []
        for k, cname in enumerate(classes):
            for f in sorted((split / cname).iterdir()):
                with Image.open(f) as im:
                    a = np.asarray(im.convert("L" if im.mode in ("L", "1", "P") and im.mode != "P" else "RGB"))
                xs.append(a[None] if a.ndim == 2 else a.transpose(2, 0, 1))
                ys.append(k)
        out += [torch.from_numpy(np.stack(xs)), torch.tensor(ys)]
    return (*out, classes)


def _make_folder(root: Path) -> str:
    """Two classes of coloured noise, 64 training and 16 test images each (--quick)."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    for split, n in (("train", 64), ("test", 16)):
        for c, ch in (("red", 0), ("blue", 2)):
            d = root / split / c
            d.mkdir(parents=True, exist_ok=True)
            for i in range(n):
                a = rng.integers(0, 90, (32, 32, 3), dtype=np.uint8)
                a[..., ch] += 150
                Image.fromarray(a).save(d / f"{i}.png")
    return f"folder:{root}"


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--data", default=None, help="folder:PATH with train/ and test/ (or val/) class folders")
    p.add_argument("--budget", default=None, help="wall-clock budget of each side (90s, 10m, 1h; default 60m, "
                   "40s with --quick)")
    p.add_argument("--only", choices=["vitkit", "timm"], default=None, help="run one side only")
    p.add_argument("--runs-dir", default=None, help="where vitkit's run folder goes (default: a temp folder)")
    p.add_argument("--quick", action="store_true")
    args, extra = p.parse_known_args(argv)
    tmp = tempfile.TemporaryDirectory()
    if args.quick:
        args.data = args.data or _make_folder(Path(tmp.name) / "data")
        args.budget = args.budget or "40s"
    if not args.data:
        p.error("--data folder:PATH is required (or --quick)")
    budget = parse_duration(args.budget or "60m")
    runs = Path(args.runs_dir or Path(tmp.name) / "runs")
    print(machine())
    print(f"data {args.data}, budget {budget:.0f} s each")
    res = {}
    if args.only in (None, "vitkit"):
        res["vitkit"] = run_vitkit(args.data, budget, runs, extra)
        print(f"vitkit: top-1 {res['vitkit']['top1']:.2f}% in {res['vitkit']['wall_s']:.0f} s "
              f"({res['vitkit']['epochs']} epochs, {res['vitkit']['precision']}, {res['vitkit']['model']})", flush=True)
    if args.only in (None, "timm"):
        res["timm"] = run_timm(args.data, budget)
        print(f"timm:   top-1 {res['timm']['top1']:.2f}% in {res['timm']['wall_s']:.0f} s ({res['timm']['epochs']} "
              f"epochs, {res['timm']['model']})", flush=True)
    if len(res) == 2:
        gap = res["vitkit"]["top1"] - res["timm"]["top1"]
        print(f"ratio vitkit/timm top-1: {res['vitkit']['top1'] / max(res['timm']['top1'], 1e-9):.3f} "
              f"({gap:+.2f} points)")
    tmp.cleanup()
    return res


if __name__ == "__main__":
    main()
