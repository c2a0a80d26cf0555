"""Token merging on a trained model: top-1 accuracy and throughput on the validation split, per r.

    vitkit train --data mnist5k --name demo                 # the demo model (vit_mini_patch7_28: 16 patch tokens)
    vitkit train --data mnist5k --model vit_mini_patch4_28 --name mnist5k-p4   # 49 patch tokens
    python benchmarks/tome_accuracy.py runs/demo --r 0 1 2
    python benchmarks/tome_accuracy.py runs/mnist5k-p4 --r 0 2 4 6

r=0 is the plain model (same outputs). Throughput: eager, the validation set in batches, medians over interleaved
repeats; the last line gives accuracy and speed per r.
"""
from __future__ import annotations

import argparse
import copy
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import interleave, machine, summarize, table  # noqa: E402

import torch  # noqa: E402

from vitkit.data import build_datasets, make_loader  # noqa: E402
from vitkit.models.tome import apply_tome, tome_flops  # noqa: E402
from vitkit.tasks.classify import evaluate, load_classifier  # noqa: E402


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("checkpoint", help="a vitkit classifier checkpoint or run folder")
    p.add_argument("--data", default="mnist5k")
    p.add_argument("--r", nargs="+", type=int, default=[0, 1, 2, 4])
    p.add_argument("--batch", type=int, default=250)
    p.add_argument("--reps", type=int, default=3)
    a = p.parse_args(argv)
    print(f"# tome_accuracy.py on {machine()}", flush=True)
    model, _ = load_classifier(a.checkpoint)
    pcfg = model.pretrained_cfg or {}
    c = model.config
    _, val, info = build_datasets(a.data, img_size=c.img_size, in_chans=c.in_chans, augment="none",
                                  mean=pcfg.get("mean"), std=pcfg.get("std"), crop_pct=pcfg.get("crop_pct", 1.0))
    batches = [x for x, _ in make_loader(val, a.batch, train=False)]
    models = {r: apply_tome(copy.deepcopy(model).eval(), r) for r in a.r}

    def run(m):
        def f():
            with torch.inference_mode():
                for x in batches:
                    m(x)
        return f
    speed = interleave({r: run(m) for r, m in models.items()}, a.reps)
    n = sum(len(x) for x in batches)
    rows, out = [], {"checkpoint": a.checkpoint, "model": c.name, "rows": []}
    base = None
    for r, m in models.items():
        ev = evaluate(m, val, batch_size=a.batch)
        s = summarize(speed[r], n)
        base = base or (s["items_per_s"], ev["top1"], tome_flops(m))
        row = dict(r=r, top1=ev["top1"], img_per_s=s["items_per_s"], speedup=s["items_per_s"] / base[0],
                   flops_ratio=base[2] / tome_flops(m))
        out["rows"].append(row)
        rows.append([r, f"{ev['top1']:.2f}", f"{ev['top1'] - base[1]:+.2f}", f"{s['items_per_s']:.0f}",
                     f"x{row['speedup']:.2f}", f"x{row['flops_ratio']:.2f}"])
    tokens = c.grid_size[0] * c.grid_size[1]
    print(f"{a.checkpoint}: {c.name or 'model'} ({tokens} patch tokens, depth {c.depth}), {info.spec} validation, "
          f"{n} images")
    print(table(rows, ["r", "top-1 %", "vs r=0", "img/s", "speed-up", "fewer FLOPs"]))
    print("tome: " + ", ".join(f"r={w['r']} top-1 {w['top1']:.2f}% x{w['speedup']:.2f}" for w in out["rows"]))
    return out


if __name__ == "__main__":
    main()
