"""Ablation of the data-efficient training options on a held-out split of a folder's *training* images.

A base recipe (a conv-stem ViT at the images' own size, crops + flips where the data is colour, AdamW, warm-up then
cosine laid over the budget) and the base with one option changed, each trained for the same wall-clock minutes
from the same seed on 90% of `train/`, scored on the other 10% (the test split is never read). The options are the
same code the CLI's flags use (`--stem`, `--patch-drop`, `--progressive`, `--aug-ramp` with batch RandAugment,
`--embed-dim`; `--tta` is scored on the base model, with and without); the loop is vitkit's modules without the
planner, so each option is measured alone.
Runs one after another in one process; the last line is the best option's top-1 over the base's.

    python benchmarks/ablation.py --data folder:/data/cifar10 --minutes 15
    python benchmarks/ablation.py --quick     # a generated folder, seconds per variant (a smoke test)
"""
from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from common import machine
from train_budget import _decode_plainly, _make_folder

import vitkit
from vitkit.data.transforms import AugmentConfig, BatchTransform
from vitkit.train.optim import build_optimizer, lr_at, set_lr

BASE = dict(embed_dim=128, depth=6, num_heads=4, mlp_ratio=2.0, stem="conv", patch_drop_rate=0.0, progressive=1.0,
            rand_ops=0, stem_channels=())
VARIANTS = {  # name → what changes from BASE
    "base (conv stem, 128 wide, 6 deep)": {},
    "patchify stem instead of conv": dict(stem="patch"),
    "patch dropout 0.25": dict(patch_drop_rate=0.25),
    "progressive resolution from 75%": dict(progressive=0.75),
    "batch RandAugment (2 ops), ramped": dict(rand_ops=2),
    "width 192 instead of 128": dict(embed_dim=192, num_heads=3),
    "stem: a full-resolution conv first (32,64,128)": dict(stem_channels=(32, 64, 128)),
    "stem: two full-resolution convs (32,32,64,128)": dict(stem_channels=(32, 32, 64, 128)),
}


def train_one(v: dict, x_tr, y_tr, x_va, y_va, seconds: float, precision: str, batch: int = 128, seed: int = 0):
    """Train the variant for `seconds` of wall clock (the cosine laid over the steps that fit); top-1 on x_va."""
    torch.manual_seed(seed)
    c, side = x_tr.shape[1], x_tr.shape[-1]
    patch = 4 if side >= 16 else 2
    colour = c == 3
    mean = (x_tr[:5000].float() / 255).mean((0, 2, 3)).tolist()
    std = (x_tr[:5000].float() / 255).std((0, 2, 3)).clamp(min=1e-3).tolist()
    aug = AugmentConfig(translate=0.125, hflip=colour, rotate=0.0 if colour else 8.0, rand_ops=v["rand_ops"],
                        ramp=0.5 if v["rand_ops"] else 0.0)
    min_size = int(v["progressive"] * side) if v["progressive"] < 1 else None
    tf_train = BatchTransform(side, mean, std, aug, min_size=min_size, multiple=patch)
    tf_eval = BatchTransform(side, mean, std, None)
    model = vitkit.create_model(img_size=side, patch_size=patch, in_chans=c, embed_dim=v["embed_dim"],
                                depth=v["depth"], num_heads=v["num_heads"], mlp_ratio=v["mlp_ratio"],
                                num_classes=int(y_tr.max()) + 1, global_pool="avg", class_token=False,
                                stem=v["stem"], patch_drop_rate=v["patch_drop_rate"],
                                stem_channels=v["stem_channels"])
    opt = build_optimizer(model, 2e-3, 0.05)
    bf16 = precision == "bf16"
    per_epoch = max(1, len(x_tr) // batch)
    step, total, t0 = 0, None, time.perf_counter()
    while total is None or step < total:
        order = torch.randperm(len(x_tr), generator=torch.Generator().manual_seed(seed + step))
        for i in range(per_epoch):
            if total is not None and step >= total:
                break
            idx = order[i * batch:(i + 1) * batch]
            progress = step / total if total else 0.0
            xb = tf_train(x_tr[idx], torch.Generator().manual_seed(step), progress=progress)
            set_lr(opt, lr_at(step, total or 10 ** 9, max(1, int(0.05 * (total or 200))), 2e-3, 1e-5))
            with torch.autocast("cpu", torch.bfloat16, enabled=bf16):
                out = model(xb)
            loss = F.cross_entropy(out.float(), y_tr[idx], label_smoothing=0.1)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            step += 1
            if step == 3:
                t3 = time.perf_counter()
            if step == 13 and total is None:  # lay the schedule over the time left
                rate = 10 / (time.perf_counter() - t3)
                # progressive: the early steps are cheaper (cost ~ tokens); a rough mean cost factor
                cf = 1.0 if min_size is None else 0.75 * (1 + v["progressive"] ** 2) / 2 + 0.25
                total = max(step + 1, int(step + (seconds - (time.perf_counter() - t0)) * rate / cf))
    model.eval()
    correct = correct_tta = 0
    with torch.no_grad(), torch.autocast("cpu", torch.bfloat16, enabled=bf16):
        for i in range(0, len(x_va), 500):
            xb, yb = tf_eval(x_va[i:i + 500], None), y_va[i:i + 500]
            p = model(xb).float().softmax(-1)
            correct += (p.argmax(-1) == yb).sum().item()
            correct_tta += ((p + model(xb.flip(-1)).float().softmax(-1)).argmax(-1) == yb).sum().item()
    return {"top1": 100.0 * correct / len(x_va), "top1_tta": 100.0 * correct_tta / len(x_va), "steps": step,
            "epochs": round(step * batch / len(x_tr), 2), "seconds": round(time.perf_counter() - t0, 1)}


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", default=None, help="folder:PATH with train/<class>/ (and test/ or val/, not read)")
    p.add_argument("--minutes", type=float, default=15.0, help="training wall clock per variant")
    p.add_argument("--precision", default="bf16", choices=["fp32", "bf16"])
    p.add_argument("--only", nargs="*", default=None, help="variant names (substrings) to run besides the base")
    p.add_argument("--quick", action="store_true")
    a = p.parse_args(argv)
    tmp = None
    if a.quick:
        tmp = tempfile.TemporaryDirectory()
        a.data, a.minutes = _make_folder(Path(tmp.name)), 0.05
    if not a.data or not a.data.startswith("folder:"):
        raise SystemExit("--data folder:PATH is needed (or --quick)")
    print(f"# ablation on {a.data}, {a.minutes:g} min per variant, {a.precision}; {machine()}", flush=True)
    x, y, _, _, classes = _decode_plainly(Path(a.data[len("folder:"):]))
    perm = torch.randperm(len(x), generator=torch.Generator().manual_seed(0))
    n_va = max(1, len(x) // 10)
    va, tr = perm[:n_va], perm[n_va:]
    results = {}
    for name, change in VARIANTS.items():
        if a.only is not None and change and not any(s in name for s in a.only):
            continue
        r = train_one({**BASE, **change}, x[tr], y[tr], x[va], y[va], 60 * a.minutes, a.precision)
        results[name] = r
        print(f"{name:40s} top-1 {r['top1']:6.2f}%  ({r['epochs']} epochs, {r['steps']} steps, {r['seconds']} s)",
              flush=True)
        if not change:  # flip averaging needs no training of its own: the base model, evaluated with it
            results["test-time flip averaging (the base model)"] = dict(r, top1=r["top1_tta"])
            print(f"{'test-time flip averaging (the base model)':40s} top-1 {r['top1_tta']:6.2f}%", flush=True)
    print(json.dumps(results))
    base = next(iter(results.values()))["top1"]
    best = max(results.items(), key=lambda kv: kv[1]["top1"])
    print(f"best option / base top-1 ratio: {best[1]['top1'] / max(base, 1e-9):.3f} ({best[0]})")
    if tmp is not None:
        tmp.cleanup()
    return results


if __name__ == "__main__":
    main()
