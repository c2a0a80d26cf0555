"""Every picture vitkit writes goes through here: matplotlib on its file-only backend (set once, here), PNGs
written atomically, and the plots more than one task draws (learning curves, confusion matrix, image grids).
"""
from __future__ import annotations

from pathlib import Path
from typing import List, Optional, Sequence

from .checkpoint import atomic_write


def pyplot():
    """matplotlib.pyplot on the Agg backend: figures render to files, with no display needed (servers, CI)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_png(fig, path, dpi: int = 100, metadata: Optional[dict] = None) -> Path:
    """Write a matplotlib figure as a PNG (atomically: a kill leaves the old file whole) and close it."""
    path = Path(path)
    try:
        atomic_write(path, lambda tmp: fig.savefig(tmp, dpi=dpi, format="png", metadata=metadata))
    finally:
        pyplot().close(fig)
    return path


def save_image_grid(images, path, nrow: int = 8, scale: int = 2) -> Path:
    """Images (B, C, H, W) in [0, 1] → one PNG grid, `nrow` per row, upscaled `scale`× (nearest) for viewing: the
    pixels themselves, no axes or captions (generated samples, MAE reconstructions)."""
    from PIL import Image
    from torchvision.utils import make_grid

    grid = make_grid(images.float(), nrow=nrow, padding=2, pad_value=0.5)
    arr = (grid.clamp(0, 1) * 255).round().byte().permute(1, 2, 0).numpy()
    img = Image.fromarray(arr[..., 0] if images.shape[1] == 1 else arr)
    if scale > 1:
        img = img.resize((img.width * scale, img.height * scale), Image.NEAREST)
    path = Path(path)
    atomic_write(path, lambda tmp: img.save(tmp, format="PNG"))
    return path


def plot_learning_curves(history: List[dict], path) -> Path:
    """Loss (train, and val where evaluated) and val top-1 per epoch, from a run's metric rows."""
    plt = pyplot()
    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 3.6))
    ep = [r["epoch"] for r in history]
    a.plot(ep, [r.get("train_loss") for r in history], label="train loss")
    evaluated = [r for r in history if "val_loss" in r or "top1" in r]  # every epoch, or every --eval-every
    if any("val_loss" in r for r in evaluated):
        a.plot([r["epoch"] for r in evaluated], [r.get("val_loss") for r in evaluated], label="val loss", marker=".")
    a.set_xlabel("epoch")
    a.legend()
    if any("top1" in r for r in evaluated):
        b.plot([r["epoch"] for r in evaluated], [r.get("top1") for r in evaluated], label="val top-1 %", marker=".")
        b.set_xlabel("epoch")
        b.legend()
    fig.tight_layout()
    return save_png(fig, path)


def plot_confusion(conf, class_names: Sequence[str], path, title: str = "") -> Path:
    """A confusion matrix (rows = true class, columns = predicted), with counts and names up to 30 classes."""
    import numpy as np

    plt = pyplot()
    m = np.asarray(conf)
    k = len(class_names)
    size = min(12, 2 + 0.45 * k)
    fig, ax = plt.subplots(figsize=(size, size))
    ax.imshow(m, cmap="Blues")
    if k <= 30:
        ax.set_xticks(range(k), class_names, rotation=90)
        ax.set_yticks(range(k), class_names)
        for i in range(k):
            for j in range(k):
                if m[i, j]:
                    ax.text(j, i, int(m[i, j]), ha="center", va="center", fontsize=7,
                            color="white" if m[i, j] > m.max() / 2 else "black")
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(title)
    fig.tight_layout()
    return save_png(fig, path)


__all__ = ["pyplot", "save_png", "save_image_grid", "plot_learning_curves", "plot_confusion"]
