"""Does the data path keep the cores on the model? Training steps fed by vitkit's loader (a folder decoded once into
uint8 memory, augmented a batch at a time) against the same steps on a batch already in memory, interleaved in
one process (medians; the last line is the ratio, >= 0.95 is the target).

    python benchmarks/loader.py --data folder:/path/to/cifar10        # the planner's model for 32-px images
    python benchmarks/loader.py --quick                               # a generated folder, a few steps (a test)
"""
from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from common import machine

import vitkit
from vitkit.data import AugmentConfig, build_datasets, make_loader
from vitkit.train.optim import build_optimizer


def _make_folder(root: Path, n: int = 256, size: int = 32) -> str:
    """A folder of random JPEGs in two classes (for --quick: the data path without real data)."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    for c in ("a", "b"):
        (root / c).mkdir(parents=True, exist_ok=True)
        for i in range(n // 2):
            Image.fromarray(rng.integers(0, 255, (size, size, 3), dtype=np.uint8)).save(root / c / f"{i}.jpg")
    return f"folder:{root}"


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--data", default=None, help="a folder:PATH of small images (default with --quick: generated)")
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--steps", type=int, default=20, help="steps per side (interleaved)")
    p.add_argument("--precision", default="bf16", choices=["fp32", "bf16"])
    p.add_argument("--quick", action="store_true")
    args = p.parse_args(argv)
    tmp = None
    if args.quick:
        tmp = tempfile.TemporaryDirectory()
        args.data = args.data or _make_folder(Path(tmp.name))
        args.steps, args.batch_size = 3, 32
    if not args.data:
        p.error("--data folder:PATH is required (or --quick)")
    torch.set_num_threads(torch.get_num_threads())
    print(machine())
    aug = AugmentConfig(translate=0.125, scale=(0.9, 1.1), hflip=True, rand_ops=1)
    train, _, info = build_datasets(args.data, img_size=32, aug=aug, progress=False)
    model = vitkit.create_model(img_size=32, patch_size=4, in_chans=info.in_chans, embed_dim=128, depth=6,
                                num_heads=4, mlp_ratio=2.0, stem="conv", global_pool="avg", class_token=False,
                                num_classes=info.num_classes).train()
    opt = build_optimizer(model, 1e-4, 0.05)
    amp = torch.autocast("cpu", dtype=torch.bfloat16) if args.precision == "bf16" else torch.autocast("cpu",
                                                                                                       enabled=False)

    def step(x, y):
        with amp:
            out = model(x)
        F.cross_entropy(out.float(), y).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    loader = iter(make_loader(train, args.batch_size, train=True, seed=0, epoch=0))
    fixed = next(iter(make_loader(train, args.batch_size, train=True, seed=0, epoch=1)))
    times = {"data path": [], "in memory": []}

    def data_path():
        nonlocal loader
        try:
            x, y = next(loader)
        except StopIteration:
            loader = iter(make_loader(train, args.batch_size, train=True, seed=0, epoch=2))
            x, y = next(loader)
        step(x, y)

    def in_memory():
        step(*fixed)

    for fn in (data_path, in_memory):  # warm-up
        fn()
    for _ in range(args.steps):
        for name, fn in (("data path", data_path), ("in memory", in_memory)):
            t = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t)
    rates = {k: args.batch_size / statistics.median(v) for k, v in times.items()}
    for k, v in rates.items():
        print(f"{k:>10}: {v:8.1f} img/s (median of {args.steps} steps, batch {args.batch_size}, {args.precision})")
    ratio = rates["data path"] / rates["in memory"]
    print(f"ratio data path / in memory: {ratio:.3f}")
    if tmp is not None:
        tmp.cleanup()
    return {"rates": rates, "ratio": ratio}


if __name__ == "__main__":
    main()
