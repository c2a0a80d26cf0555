"""Datasets and their transforms: `build_datasets(spec)` → (train, val, info), `make_loader` → batches.

Specs: `mnist5k` (embedded, the default), `digits`, `folder:PATH`, `mnist`, `fashion_mnist`, `cifar10`, `cifar100`,
and `wds:DIR` (WebDataset shards written by `vitkit shards`; also a brace pattern or a comma list of shards).

    train, val, info = build_datasets("mnist5k", img_size=28, in_chans=1)
    for x, y in make_loader(train, 128, train=True, seed=0, epoch=0):   # x (B, 1, 28, 28) float, y (B,)
        ...

Built-in datasets are in-memory uint8 tensors augmented per batch (no DataLoader workers); folders are read by
Pillow per sample through a DataLoader; shards stream through DataLoader workers that decode, with the batch
augmentation of in-memory data (`vitkit.data.shards`). All are deterministic given (seed, epoch): the order and the
random augmentation of batch `step` depend on nothing else, which is what makes resume and multi-process runs exact.
"""
from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from typing import Iterator, List, Optional, Sequence, Tuple

import numpy as np
import torch

from ..errors import ConfigError, DataError
from ..models.preprocessing import Preprocessing
from .folders import FolderScan, decode_folder, scan_folder
from .profile import DataProfile, profile_images, stratified_sample
from .sources import (TORCHVISION, DatasetInfo, ImageFolderDataset, InMemoryDataset, load_digits,
                      load_mnist5k, load_torchvision, skip_bad_collate, stratified_split)
from .shards import ShardDataset, ShardLoader
from .images import IMG_EXTENSIONS, collect_images, image_files, list_images, read_image, to_model_mode
from .transforms import (CIFAR_MEAN, CIFAR_STD, HALF_MEAN, MNIST_MEAN, MNIST_STD, AugmentConfig, BatchTransform,
                         MixUp, default_augment, eval_transform, folder_train_transform)

log = logging.getLogger(__name__)

DATASETS = ["mnist5k", "digits", "folder:PATH", "mnist", "fashion_mnist", "cifar10", "cifar100", "wds:DIR"]


def list_datasets() -> List[str]:
    return list(DATASETS)


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
    """A stratified subset of at most n samples (for quick runs and tests); shards: epochs of n samples."""
    if isinstance(ds, ShardDataset):
        return ds.limited(n)
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


def memory_limit() -> int:
    """Bytes a decoded folder may take in memory: $VITKIT_MEMORY_LIMIT (bytes), else 30% of the available RAM."""
    env = os.environ.get("VITKIT_MEMORY_LIMIT")
    if env:
        return int(float(env))
    try:
        with open("/proc/meminfo") as f:
            avail = next(int(line.split()[1]) * 1024 for line in f if line.startswith("MemAvailable"))
        return int(0.3 * avail)
    except (OSError, StopIteration, ValueError):
        return 4 << 30


@dataclass
class DataSource:
    """A data set opened but not yet shaped for a model: built-in sets as uint8 tensors at their own size, folders
    as a scan (file list and headers) with the train/validation split decided. `profile()` measures it."""

    spec: str
    info: DatasetInfo
    train: Optional[InMemoryDataset] = None  # built-in sets
    val: Optional[InMemoryDataset] = None
    scan: Optional[FolderScan] = None  # folders: scan.files[train_idx] / [val_idx]
    train_idx: Optional[np.ndarray] = None
    val_idx: Optional[np.ndarray] = None
    held_out_is_test: bool = False  # the held-out split is a test set: report on it, never choose by it
    shards: Optional[object] = None  # wds: a `vitkit.data.shards.ShardSet`
    _profile: Optional[DataProfile] = None

    @property
    def num_train(self) -> int:
        if self.shards is not None:
            return self.shards.train.num_samples
        return len(self.train) if self.train is not None else len(self.train_idx)

    @property
    def num_val(self) -> int:
        if self.shards is not None:
            return self.shards.val.num_samples if self.shards.val is not None else 0
        return len(self.val) if self.val is not None else len(self.val_idx)

    def train_labels(self) -> torch.Tensor:
        if self.train is not None:
            return self.train.labels
        return torch.from_numpy(self.scan.labels[self.train_idx])

    def profile(self, sample: int = 5000) -> DataProfile:
        """Counts, sizes, colour, symmetry and statistics of the training split (pixels measured on up to `sample`
        images, decoded small for folders). Computed once."""
        if self._profile is None and self.shards is not None:
            self._profile = _shard_profile(self.shards, sample)
            self.info.kind = "natural" if self._profile.mirror_symmetric else "oriented"
        if self._profile is None:
            labels = self.train_labels()
            idx = stratified_sample(labels, sample, seed=0)
            k = self.info.num_classes
            counts = torch.bincount(labels, minlength=k).tolist()
            images = sizes = chans = None
            if self.train is not None:
                images, sizes, chans = self.train.images[idx], None, self.train.images.shape[1]
            else:  # folders: a sample decoded small; the result is cached with the folder's listing
                from .folders import cached_json

                def measure():
                    return self._profile_folder(idx, labels, k, counts).to_dict()

                d = cached_json(self.scan, "profile", measure, sample=sample, train=self.train_idx.tolist())
                self._profile = DataProfile.from_dict(d)
            if self._profile is None:
                self._profile = profile_images(images, labels[idx], k, num_train=self.num_train,
                                               num_val=self.num_val, class_counts=counts, sizes=sizes,
                                               channels=chans)
            self.info.kind = "natural" if self._profile.mirror_symmetric else "oriented"
        return self._profile


    def _profile_folder(self, idx, labels, k, counts) -> DataProfile:
        from .folders import _decode_chunk

        sizes = self.scan.sizes[self.train_idx]
        side = int(min(64, max(8, np.median(sizes.min(axis=1)))))
        files = [self.scan.files[i] for i in self.train_idx[idx.numpy()]]
        arr, bad = _decode_chunk((files, side, 3, True))
        keep = [i for i in range(len(files)) if i not in set(bad)]
        images, idx = torch.from_numpy(arr[keep]), idx[keep]
        modes = {self.scan.modes[i] for i in self.train_idx}
        chans = 1 if modes <= {"1", "L", "I", "I;16", "F", "LA", "La"} else 3
        if chans == 1:
            images = images[:, :1]
        return profile_images(images, labels[idx], k, num_train=self.num_train, num_val=self.num_val,
                              class_counts=counts, sizes=sizes, channels=chans)


def _shard_profile(shards, sample: int) -> DataProfile:
    """The profile `_info.json` records (what `vitkit shards` measured when it wrote them), else one measured on
    the first `sample` images of the training shards (shards written by other tools)."""
    if shards.profile_dict:
        return DataProfile.from_dict(shards.profile_dict)
    ds = ShardDataset(shards.train, len(shards.class_names), 3, 32)
    xs, ys = [], []
    for x, y in ShardLoader(ds.limited(min(sample, len(ds))), 256, train=False):
        xs.append((x * 255).round().to(torch.uint8))
        ys.append(y)
    images, labels = torch.cat(xs), torch.cat(ys)
    k = len(shards.class_names)
    scale = shards.train.num_samples / max(1, len(labels))
    counts = [int(round(c * scale)) for c in torch.bincount(labels, minlength=k).tolist()]
    num_val = shards.val.num_samples if shards.val is not None else 0
    prof = profile_images(images, labels, k, num_train=shards.train.num_samples, num_val=num_val,
                          class_counts=counts)
    prof.notes.append(f"measured on the first {len(labels)} training samples (no profile in _info.json); sizes "
                      "are after decoding to 32 px")
    return prof


def open_data(spec: str, *, data_dir="data", download: bool = False, val_split: float = 0.1, seed: int = 0,
              strict: bool = False) -> DataSource:
    """Open a data set spec (see DATASETS) without shaping it: load built-in sets, scan folders (headers only),
    check shards against their `_info.json`."""
    spec = str(spec)
    if spec.startswith("wds:"):
        from .shards import open_shards

        shards = open_shards(spec[len("wds:"):])
        n_val = shards.val.num_samples if shards.val is not None else 0
        info = DatasetInfo(f"wds:{shards.where}", list(shards.class_names), 3, (0, 0), "", shards.train.num_samples,
                           n_val, [], f"shards: {len(shards.train)} {shards.train.name} shard(s), "
                           f"{len(shards.val) if shards.val is not None else 0} held-out")
        return DataSource(spec, info, shards=shards, held_out_is_test=shards.held_out_is_test)
    if spec.startswith("folder:"):
        scan = scan_folder(spec[len("folder:"):], strict=strict)
        split = np.asarray(scan.split)
        if scan.held_out_dir:
            tr, va = np.nonzero(split == "train")[0], np.nonzero(split == "val")[0]
            note = f"train/ and {scan.held_out_dir}/ folders"
        else:
            if not 0 < val_split < 1:
                raise DataError(f"--val-split must be between 0 and 1, got {val_split}")
            tr, va = (t.numpy() for t in stratified_split(torch.from_numpy(scan.labels), val_frac=val_split,
                                                          seed=seed))
            note = f"seeded {val_split:.0%} validation split (seed {seed})"
        if scan.skipped:
            log.warning("skipped %d unreadable image(s) in %s", len(scan.skipped), scan.root)
        info = DatasetInfo(f"folder:{scan.root}", list(scan.classes), 3, (0, 0), "", len(tr), len(va),
                           list(scan.skipped), note)
        return DataSource(spec, info, scan=scan, train_idx=tr, val_idx=va,
                          held_out_is_test=scan.held_out_dir == "test")
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
    # every built-in set's held-out split is its test set (torchvision's test split; mnist5k's fixed 1,000)
    return DataSource(spec, info, train=train, val=val, held_out_is_test=spec != "digits")


def _size_pair(size) -> Tuple[int, int]:
    return (int(size), int(size)) if isinstance(size, int) else (int(size[0]), int(size[1]))


def build_datasets(spec, *, img_size=None, in_chans: Optional[int] = None, augment: str = "default",
                   aug: Optional[AugmentConfig] = None, mean: Optional[Sequence[float]] = None,
                   std: Optional[Sequence[float]] = None, crop_pct: float = 1.0, data_dir="data",
                   download: bool = False, val_split: float = 0.1, seed: int = 0, strict: bool = False,
                   max_train: Optional[int] = None, max_val: Optional[int] = None, min_size: Optional[int] = None,
                   multiple: int = 1, stream: Optional[bool] = None, progress: bool = True):
    """Resolve a dataset spec (or an opened `DataSource`) into (train dataset, val dataset, DatasetInfo).

    img_size / in_chans: what the model takes (default: the data's own; folders: their median size, their channels).
    augment: 'none' | 'light' | 'default' | 'strong' for the training transform, or `aug` an explicit one.
    mean/std: normalisation (default: measured on the training images). min_size/multiple: progressive resizing
    (see BatchTransform). Folders whose decoded images fit in `memory_limit()` are decoded once (in parallel,
    cached on disk) and augmented a batch at a time like the built-in sets; larger ones stream from disk through
    DataLoader workers (`stream=True` forces that). max_train / max_val: stratified subsets, for quick runs.
    The validation split of mnist5k and digits is fixed (seed 0) whatever `seed` is, so scores compare."""
    src = spec if isinstance(spec, DataSource) else open_data(spec, data_dir=data_dir, download=download,
                                                              val_split=val_split, seed=seed, strict=strict)
    info = src.info
    prof = src.profile()
    chans = in_chans or prof.in_chans
    if mean is not None:
        m, s = list(mean), list(std)
    else:  # measured on the training images (grey data: the one channel's statistics, repeated if needed)
        m, s = (prof.mean * chans)[:chans] if len(prof.mean) == 1 else prof.mean, \
            (prof.std * chans)[:chans] if len(prof.std) == 1 else prof.std
        if len(m) != chans:
            m, s = [sum(m) / len(m)] * chans, [sum(s) / len(s)] * chans
    if aug is None:
        aug = None if augment == "none" else default_augment(info.kind, augment)
    if src.shards is not None:  # streamed: decoded in the loader's workers at the model's size
        size = _size_pair(img_size or min(prof.native_size))
        k, where = len(info.class_names), str(src.shards.where)
        train = ShardDataset(src.shards.train, k, chans, max(size), info_path=where)
        if src.shards.val is None:
            raise DataError(f"{where} has no held-out split (validation shards); write the shards with `vitkit "
                            "shards`, which writes one")
        val = ShardDataset(src.shards.val, k, chans, max(size), info_path=where)
    elif src.train is not None:
        train, val = src.train, src.val
        if chans != train.images.shape[1]:
            train = InMemoryDataset(_convert_channels(train.images, chans), train.labels)
            val = InMemoryDataset(_convert_channels(val.images, chans), val.labels)
        size = _size_pair(img_size or tuple(train.images.shape[-2:]))
    else:
        scan = src.scan
        native = int(np.median(scan.sizes[src.train_idx].min(axis=1)))
        size = _size_pair(img_size or native)
        side = max(size)
        need = len(scan) * chans * side * side
        if stream is None:
            stream = need > memory_limit()
            if stream:
                log.info("%s decoded at %d px would take %.1f GB, over the %.1f GB memory limit: streaming from "
                         "disk", info.spec, side, need / 1e9, memory_limit() / 1e9)
        if stream:
            samples = [(scan.files[i], int(scan.labels[i])) for i in range(len(scan))]
            train = ImageFolderDataset([samples[i] for i in src.train_idx], chans)
            val = ImageFolderDataset([samples[i] for i in src.val_idx], chans)
            train.transform = folder_train_transform(size, m, s, info.kind, "none" if aug is None else augment)
            val.transform = eval_transform(Preprocessing(mean=tuple(m), std=tuple(s), crop_pct=crop_pct), size)
        else:
            images, labels, bad = decode_folder(scan, side, chans, progress=progress)
            if bad and strict:
                raise DataError(f"corrupt or unreadable image {bad[0]!r} (it does not decode); fix or remove it, or "
                                "drop --strict to skip such files with a warning")
            if bad:
                info.skipped = list(info.skipped) + bad
            pos = np.full(len(scan), -1, np.int64)  # scan index → row of the decoded array (-1: did not decode)
            kept = np.setdiff1d(np.arange(len(scan)), np.asarray([scan.files.index(f) for f in bad], np.int64)) \
                if bad else np.arange(len(scan))
            pos[kept] = np.arange(len(kept))
            images, labels = torch.from_numpy(images), torch.from_numpy(labels)
            tr, va = pos[src.train_idx], pos[src.val_idx]
            tr, va = torch.from_numpy(tr[tr >= 0]), torch.from_numpy(va[va >= 0])
            train, val = InMemoryDataset(images[tr], labels[tr]), InMemoryDataset(images[va], labels[va])
    if isinstance(train, (InMemoryDataset, ShardDataset)):
        train.transform = BatchTransform(size, m, s, aug, min_size=min_size, multiple=multiple)
        val.transform = BatchTransform(size, m, s, None, crop_pct=crop_pct)
    info.in_chans, info.img_size = chans, size
    train, val = _limit(train, max_train, seed), _limit(val, max_val, seed)
    info.num_train, info.num_val = len(train), len(val)
    if len(train) == 0 or len(val) == 0:
        raise DataError(f"dataset {info.spec!r} has {len(train)} training and {len(val)} validation images; both "
                        "must be non-empty")
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
                 world: int = 1, workers: int = 0, drop_last: Optional[bool] = None, mixup: Optional[MixUp] = None,
                 start_step: int = 0, total_steps: Optional[int] = None, accum_steps: int = 1, start_batch: int = 0):
        self.ds, self.bs, self.train, self.seed, self.epoch = dataset, batch_size, train, seed, epoch
        self.start_batch = int(start_batch)  # resume mid-epoch: skip the first batches (len() stays the epoch's)
        self.rank, self.world, self.workers, self.mixup = rank, world, workers, mixup
        # where each batch falls in the schedule (0 → 1), for progressive resizing and growing augmentation
        self.start_step, self.total_steps, self.accum_steps = start_step, total_steps, max(1, accum_steps)
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

    def progress(self, batch: int) -> float:
        """The schedule position (0 to 1) of this epoch's batch `batch`; 1.0 when no schedule is given."""
        if not self.total_steps:
            return 1.0
        return min(1.0, (self.start_step + batch // self.accum_steps) / self.total_steps)

    def _iter_memory(self):
        ds = self.ds
        for step, idx in enumerate(self.batches):
            if step < self.start_batch:
                continue
            gen = torch.Generator().manual_seed(_step_seed(self.seed, self.epoch, step))
            lo, local = _shard(idx, self.rank, self.world)
            x = ds.images[local]
            p = self.progress(step)
            x = ds.transform(x, gen, lo, len(idx), progress=p) if ds.transform is not None else x.float().div(255)
            y = ds.labels[local]
            if self.mixup is not None:
                x, y = self.mixup(x, y, gen, progress=p)
            yield x, y

    def _iter_files(self):
        local = [_shard(idx, self.rank, self.world)[1].tolist() for idx in self.batches[self.start_batch:]]
        g = torch.Generator().manual_seed(_step_seed(self.seed, self.epoch, -2))
        dl = torch.utils.data.DataLoader(self.ds, batch_sampler=local, num_workers=self.workers, generator=g,
                                         persistent_workers=False, collate_fn=skip_bad_collate)
        for step, (x, y) in enumerate(dl, start=self.start_batch):
            if len(y) == 0:  # every file of this batch failed to decode
                continue
            if self.mixup is not None:
                x, y = self.mixup(x, y, torch.Generator().manual_seed(_step_seed(self.seed, self.epoch, step)),
                                  progress=self.progress(step))
            yield x, y


def make_loader(dataset, batch_size: int, **kw):
    """Batches of `dataset` for one epoch; see `Loader` for the arguments (`ShardLoader` for shards)."""
    if isinstance(dataset, ShardDataset):
        return ShardLoader(dataset, batch_size, **kw)
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

    def __post_init__(self) -> None:
        """Each field checked (a one-line ConfigError naming it). `val_split` splits PATH/<class>/* folders only:
        None means the default 0.1, and another value for a built-in set (whose held-out split is fixed) is an
        error rather than silently ignored."""
        from .. import validate as v

        if not isinstance(self.data, str) or not self.data:
            raise ConfigError(f"data must be a dataset spec ({', '.join(DATASETS)}), got {self.data!r}", field="data")
        v.choice(self.augment, "augment", ("none", "light", "default", "strong"))
        if self.val_split is None:
            self.val_split = 0.1
        v.number(self.val_split, "val_split", lo=0, hi=1, lo_open=True, hi_open=True)
        if self.val_split != 0.1 and not self.data.startswith("folder:"):
            raise ConfigError(f"val_split applies to folder:PATH data only; {self.data} has a fixed held-out split, "
                              f"got {self.val_split!r}", field="val_split")
        v.integer(self.max_train, "max_train", lo=1, optional=True)
        v.integer(self.max_val, "max_val", lo=1, optional=True)
        v.flag(self.download, "download")
        v.flag(self.strict, "strict")

    def open(self, seed: int) -> DataSource:
        """The data set opened (loaded or scanned, split), not yet shaped for a model: see `open_data`."""
        return open_data(self.data, data_dir=self.data_dir, download=self.download, val_split=self.val_split,
                         seed=seed, strict=self.strict)

    def datasets(self, seed: int, **model_input):
        """(train, val, DatasetInfo) for these options; model_input: img_size, in_chans, mean, std (the model's)."""
        return build_datasets(self.data, augment=self.augment, data_dir=self.data_dir, download=self.download,
                              val_split=self.val_split, seed=seed, strict=self.strict, max_train=self.max_train,
                              max_val=self.max_val, **model_input)


__all__ = [
    "DataOptions", "build_datasets", "open_data", "DataSource", "DataProfile", "memory_limit", "make_loader", "Loader",
    "list_datasets", "DatasetInfo", "InMemoryDataset",
    "ImageFolderDataset", "BatchTransform", "AugmentConfig", "MixUp", "default_augment", "eval_transform",
    "folder_train_transform", "read_image", "to_model_mode", "stratified_split", "IMG_EXTENSIONS", "DATASETS",
    "image_files", "list_images", "collect_images", "ShardDataset", "ShardLoader",
]
