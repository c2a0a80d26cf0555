"""Images for the task tests: vitkit's own mnist5k split, PNG folders of its digits, and a colour folder."""
import functools

import numpy as np
import torch


@functools.lru_cache(maxsize=1)
def mnist5k():
    """vitkit's mnist5k split (`build_datasets("mnist5k")`: 4,000 training digits, a fixed held-out 1,000) as
    ((N, 1, 28, 28) float in [0, 1], labels) pairs, so a model trained on the first pair never saw the second.
    Each split comes in a fixed shuffled order (vitkit's is sorted by class), so any slice mixes the classes."""
    from vitkit.data import build_datasets

    train, val, _ = build_datasets("mnist5k", augment="none")
    out = []
    for ds in (train, val):
        order = torch.randperm(len(ds), generator=torch.Generator().manual_seed(0))
        out.append((ds.images[order].float() / 255.0, ds.labels[order].clone()))
    return tuple(out)


def write_digits(folder, images, labels, prefix="img"):
    """Save (N, 1, 28, 28) [0, 1] digits as PNGs in class sub-folders; returns the paths."""
    from PIL import Image

    paths = []
    for i, (im, lab) in enumerate(zip(images, labels)):
        d = folder / str(int(lab))
        d.mkdir(parents=True, exist_ok=True)
        p = d / f"{prefix}{i:05d}.png"
        Image.fromarray((im[0].numpy() * 255).round().astype(np.uint8), "L").save(p)
        paths.append(p)
    return paths


def color_folder(root, n=20, size=24, ext="jpg"):
    """Two classes a model can tell apart (reddish vs bluish noise) in PATH/<class>/ layout; returns the spec."""
    from PIL import Image

    rng = np.random.default_rng(0)
    for c, ch in (("red", 0), ("blue", 2)):
        (root / c).mkdir(parents=True)
        for i in range(n):
            arr = rng.integers(0, 90, (size, size, 3), dtype=np.uint8)
            arr[..., ch] += 150
            Image.fromarray(arr).save(root / c / f"{i}.{ext}")
    return f"folder:{root}"
