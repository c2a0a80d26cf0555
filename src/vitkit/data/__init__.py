"""Datasets and their transforms: `build_datasets(spec)` → (train, val, info), `make_loader` → batches.

Specs: `mnist5k` (embedded, the default), `digits`, `folder:PATH`, `mnist`, `fashion_mnist`, `cifar10`, `cifar100`.

    train, val, info = build_datasets("mnist5k", img_size=28, in_chans=1)
    for x, y in make_loader(train, 128, train=True, seed=0, epoch=0):   # x (B, 1, 28, 28) float, y (B,)
        ...

Built-in datasets are in-memory uint8 tensors augmented per batch (no DataLoader workers); folders are read by
Pillow per sample through a DataLoader. Both are deterministic given (seed, epoch): the order and the random
augmentation of batch `step` depend on nothing else, which is what makes resume and multi-process runs exact.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Iterator, List, Optional, Sequence, Tuple

import torch

from ..errors import ConfigError, DataError
from .sources import (IMG_EXTENSIONS, TORCHVISION, DatasetInfo, ImageFolderDataset, InMemoryDataset, load_digits,
                      load_folder, load_mnist5k, load_torchvision, read_image, stratified_split)
from .transforms import (CIFAR_MEAN, CIFAR_STD, HALF_MEAN, MNIST_MEAN, MNIST_STD, AugmentConfig, BatchTransform,
                         MixUp, default_augment, eval_transform, folder_train_transform)

log = logging.getLogger(__name__)

DATASETS = ["mnist5k", "digits", "folder:PATH", "mnist", "fashion_mnist", "cifar10", "cifar100"]


def list_datasets() -> List[str]:
    return list(DATASETS)


def default_norm(info: DatasetInfo, in_chans: int) -> Tuple[Tuple[float, ...], Tuple[float, ...]]:
    """Normalisation statistics per dataset: MNIST's for digit data, CIFAR's for CIFAR, 0.5/0.5 otherwise."""
    if info.spec in ("mnist5k", "digits", "mnist"):
        m, s = MNIST_MEAN, MNIST_STD
    elif info.spec in ("cifar10", "cifar100"):
        m, s = CIFAR_MEAN, CIFAR_STD
    else:
        m, s = HALF_MEAN[:1], HALF_MEAN[:1]
    if len(m) != in_chans:
        m, s = (sum(m) / len(m),) * in_chans, (sum(s) / len(s),) * in_chans
    return tuple(m), tuple(s)


def _convert_channels(x: torch.Tensor, in_chans: int) -> torch.Tensor:
    """uint8 (N, C, H, W) → `in_chans` channels: grey repeated to RGB, or RGB to grey (ITU-R 601 luma)."""
    c = x.shape[1]
    if c == in_chans:
        return x
    if c == 1 and in_chans == 3:
        return x.repeat(1, 3, 1, 1)
    if c == 3 and in_chans == 1:
        w = torch.tensor([0.299, 0.587, 0.114]).view(1, 3, 1, 1)
        return (x.float() * w).sum(1, keepdim=True).round().clamp(0, 255).to(torch.uint8)
    raise DataError(f"cannot convert {c}-channel images to {in_chans} channels; use a model with 1 or 3 channels")


def _limit(ds, n: Optional[int], seed: int):
    """A stratified subset of at most n samples (for quick runs and tests)."""
    if n is None or n >= len(ds):
        return ds
    if n < 1:
        raise ConfigError(f"a dataset limit must be >= 1, got {n}")
    labels = ds.labels
    _, keep = stratified_split(labels, val_frac=n / len(ds), seed=seed + 1)
    keep = keep[:n]
    if isinstance(ds, InMemoryDataset):
        return ds.subset(keep)
    return ImageFolderDataset([ds.samples[i] for i in keep.tolist()], ds.in_chans, ds.transform)


def build_datasets(spec: str, *, img_size=None, in_chans: Optional[int] = None, augment: str = "default",
                   mean: Optional[Sequence[float]] = None, std: Optional[Sequence[float]] = None,
                   crop_pct: float = 1.0, data_dir="data", download: bool = False, val_split: float = 0.1,
                   seed: int = 0, strict: bool = False, max_train: Optional[int] = None,
                   max_val: Optional[int] = None):
    """Resolve a dataset spec into (train dataset, val dataset, DatasetInfo), with transforms attached.

    img_size / in_chans: what the model takes (default: the data's own; folders default to 224 and 3 channels).
    augment: 'none' | 'light' | 'default' | 'strong' for the training transform. mean/std: normalisation
    (default per dataset, see `default_norm`). max_train / max_val: stratified subsets, for quick runs.
    The validation split of mnist5k and digits is fixed (seed 0) whatever `seed` is, so scores compare."""
    spec = str(spec)
    if spec.startswith("folder:"):
        chans = in_chans or 3
        train, val, info = load_folder(spec[len("folder:"):], val_split=val_split, seed=seed, strict=strict,
                                       in_chans=chans)
        size = img_size or 224
        info.in_chans, info.img_size = chans, (size, size) if isinstance(size, int) else tuple(size)
        m, s = (mean, std) if mean is not None else default_norm(info, chans)
        train.transform = folder_train_transform(size, m, s, info.kind, augment)
        val.transform = eval_transform(size, m, s, crop_pct=crop_pct)
    else:
        if spec == "mnist5k":
            train, val, info = load_mnist5k()
        elif spec == "digits":
            train, val, info = load_digits()
        elif spec in TORCHVISION:
            train, val, info = load_torchvision(spec, data_dir, download)
        else:
            import difflib

            close = difflib.get_close_matches(spec, [d.split(":")[0] for d in DATASETS], n=1)
            hint = f" (did you mean {close[0]}?)" if close else ""
            raise DataError(f"unknown dataset {spec!r}{hint}; known: {', '.join(DATASETS)}")
        chans = in_chans or info.in_chans
        if chans != info.in_chans:
            train.images, val.images = _convert_channels(train.images, chans), _convert_channels(val.images, chans)
            info.in_chans = chans
        size = img_size or info.img_size
        m, s = (mean, std) if mean is not None else default_norm(info, chans)
        aug = default_augment(info.kind, augment)
        train.transform = BatchTransform(size, m, s, None if augment == "none" else aug)
        val.transform = BatchTransform(size, m, s, None)
        info.img_size = (size, size) if isinstance(size, int) else tuple(size)
    train, val = _limit(train, max_train, seed), _limit(val, max_val, seed)
    info.num_train, info.num_val = len(train), len(val)
    if len(train) == 0 or len(val) == 0:
        raise DataError(f"dataset {spec!r} has {len(train)} training and {len(val)} validation images; both must "
                        "be non-empty")
    info.mean, info.std = list(m), list(s)  # type: ignore[attr-defined]
    return train, val, info


def _step_seed(seed: int, epoch: int, step: int) -> int:
    """A seed for batch `step` of `epoch` that depends on nothing else (SplitMix-style mixing)."""
    z = (seed * 0x9E3779B97F4A7C15 + epoch * 0xBF58476D1CE4E5B9 + step * 0x94D049BB133111EB + 1) & (2**64 - 1)
    z = ((z ^ (z >> 31)) * 0xBF58476D1CE4E5B9) & (2**64 - 1)
    return int(z >> 2)


def _global_batches(n: int, batch_size: int, train: bool, seed: int, epoch: int, drop_last: bool):
    if train:
        order = torch.randperm(n, generator=torch.Generator().manual_seed(_step_seed(seed, epoch, -1)))
    else:
        order = torch.arange(n)
    stop = (n // batch_size) * batch_size if drop_last else n
    return [order[i:i + batch_size] for i in range(0, stop, batch_size)]


def _shard(idx: torch.Tensor, rank: int, world: int) -> Tuple[int, torch.Tensor]:
    """This rank's contiguous slice of a global batch: (offset, indices)."""
    per = -(-len(idx) // world)
    lo = min(rank * per, len(idx))
    return lo, idx[lo:lo + per]


class Loader:
    """Batches (x, y) of one epoch. `batch_size` is the global batch; in a distributed run each rank gets its
    contiguous slice. Length = number of steps."""

    def __init__(self, dataset, batch_size: int, *, train: bool, seed: int = 0, epoch: int = 0, rank: int = 0,
                 world: int = 1, workers: int = 0, drop_last: Optional[bool] = None, mixup: Optional[MixUp] = None):
        self.ds, self.bs, self.train, self.seed, self.epoch = dataset, batch_size, train, seed, epoch
        self.rank, self.world, self.workers, self.mixup = rank, world, workers, mixup
        drop_last = train if drop_last is None else drop_last
        if train and len(dataset) < batch_size:
            drop_last = False  # tiny datasets: one short batch rather than none
        self.batches = _global_batches(len(dataset), batch_size, train, seed, epoch, drop_last)

    def __len__(self) -> int:
        return len(self.batches)

    def __iter__(self) -> Iterator:
        if isinstance(self.ds, InMemoryDataset):
            yield from self._iter_memory()
        else:
            yield from self._iter_files()

    def _iter_memory(self):
        ds = self.ds
        for step, idx in enumerate(self.batches):
            gen = torch.Generator().manual_seed(_step_seed(self.seed, self.epoch, step))
            lo, local = _shard(idx, self.rank, self.world)
            x = ds.images[local]
            x = ds.transform(x, gen, lo, len(idx)) if ds.transform is not None else x.float().div(255)
            y = ds.labels[local]
            if self.mixup is not None:
                x, y = self.mixup(x, y, gen)
            yield x, y

    def _iter_files(self):
        local = [_shard(idx, self.rank, self.world)[1].tolist() for idx in self.batches]
        g = torch.Generator().manual_seed(_step_seed(self.seed, self.epoch, -2))
        dl = torch.utils.data.DataLoader(self.ds, batch_sampler=local, num_workers=self.workers, generator=g,
                                         persistent_workers=False)
        for step, (x, y) in enumerate(dl):
            if self.mixup is not None:
                x, y = self.mixup(x, y, torch.Generator().manual_seed(_step_seed(self.seed, self.epoch, step)))
            yield x, y


def make_loader(dataset, batch_size: int, **kw) -> Loader:
    """Batches of `dataset` for one epoch; see `Loader` for the arguments."""
    return Loader(dataset, batch_size, **kw)


@dataclass
class DataOptions:
    """Which data a task trains on and how much of it: the fields every task config (classifier, MAE, DiT) shares,
    passed to `build_datasets` by `datasets()`."""

    data: str = "mnist5k"
    augment: str = "default"
    data_dir: str = "data"
    download: bool = False
    val_split: float = 0.1
    strict: bool = False
    max_train: Optional[int] = None
    max_val: Optional[int] = None

    def datasets(self, seed: int, **model_input):
        """(train, val, DatasetInfo) for these options; model_input: img_size, in_chans, mean, std (the model's)."""
        return build_datasets(self.data, augment=self.augment, data_dir=self.data_dir, download=self.download,
                              val_split=self.val_split, seed=seed, strict=self.strict, max_train=self.max_train,
                              max_val=self.max_val, **model_input)


__all__ = [
    "DataOptions", "build_datasets", "make_loader", "Loader", "list_datasets", "DatasetInfo", "InMemoryDataset",
    "ImageFolderDataset", "BatchTransform", "AugmentConfig", "MixUp", "default_augment", "eval_transform",
    "folder_train_transform", "read_image", "stratified_split", "IMG_EXTENSIONS", "DATASETS",
]
