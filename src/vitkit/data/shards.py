"""WebDataset shards: a data set written once as tar shards in timm's layout, then streamed in training.

    write_shards("folder:~/photos", "shards/photos", shard_size="500MB")   # train-000000.tar, ... + _info.json
    src = open_data("wds:shards/photos")          # also wds:DIR/train-{000000..000009}.tar or wds:a.tar,b.tar

Layout (what timm's `wds` reader reads): each sample is `NNNNNN.jpg|png` (the image's bytes) + `NNNNNN.cls` (the
class index as text) + `NNNNNN.json` (the file it came from); `_info.json` holds timm's
`splits.{train,validation}.{name, num_samples, filenames, shard_lengths}`, each shard's sha256 and byte size, the
class names, and image statistics (size distribution, channel mean/std: vitkit's data profile, which the planner
reads instead of scanning).

Streaming an epoch (`ShardLoader`, all of it deterministic given seed and epoch):
- the shard list is shuffled by (seed, epoch) and dealt to a fixed number L of streams (the run's `streams`:
  stream g takes every L-th shard from the g-th); each stream reads its shards in turn through a shuffle buffer
  seeded by (seed, epoch, g). With fewer shards than streams each stream draws shards with replacement instead
  (resampled mode), seeded by (seed, epoch, g).
- every global batch takes batch_size / L samples from each stream (one more from the first batch_size % L), placed
  in stream order; process r reads streams r, r + P, r + 2P, ... (P processes; P must divide L), spread over its
  DataLoader workers. So the global batches, augmentation included, are the same in 1 process or P processes with
  any number of workers: what changes is only who reads which stream (MixUp/CutMix aside: they mix within a
  process's batch, as for all data). An epoch is `num_samples // batch_size` steps; a stream whose shards run out
  starts another shuffled pass and one with more leaves the rest (as timm's reader does). Workers decode to uint8
  squares; the batch augmentation runs in the main process with the same per-step generators as in-memory data,
  each sample taking the draws of its place in the global batch.
- resume: `start_batch` replays each stream up to its next batch without decoding, so a resumed epoch yields
  exactly the batches the uninterrupted one would have, in any number of processes that divides L.
- a sample that does not decode, or has no `.cls`, is left out of its batch (one image short) and counted.
- `_info.json` must match the shards: every listed shard present with its byte size; sample counts and sha256 are
  checked up front for small sets and, for large ones, as each shard is read through. A mismatch is one DataError.
"""
from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import random
import re
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, Iterator, List, Optional, Sequence, Tuple

import numpy as np
import torch

from ..errors import ConfigError, DataError

log = logging.getLogger(__name__)

INFO_FILE = "_info.json"
FORMAT_VERSION = 1
IMAGE_KEYS = ("jpg", "jpeg", "png", "webp", "ppm", "bmp", "tif", "tiff")
VERIFY_UPFRONT_BYTES = 256 << 20  # sets up to this size are checksummed when opened; larger ones while streaming
SHUFFLE_BUFFER, SHUFFLE_INITIAL = 2000, 500  # samples (raw bytes) a worker shuffles among
SHARD_MTIME = 1_700_000_000  # the members' modification time in written shards (fixed: reproducible shards)


def _wds():
    try:
        import webdataset
    except ImportError:
        raise DataError("shards need the webdataset package: pip install 'webdataset>=1.0'") from None
    return webdataset


def _mix(*parts: int) -> int:
    """One 63-bit seed from several integers (SplitMix-style), e.g. (seed, epoch, worker, pass)."""
    z = 0x9E3779B97F4A7C15
    for p in parts:
        z = (z ^ (int(p) + 0x9E3779B97F4A7C15 + (z << 6) + (z >> 2))) & (2**64 - 1)
        z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & (2**64 - 1)
        z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & (2**64 - 1)
    return int(z >> 1)


def parse_size(text) -> int:
    """'500MB', '2GB', '64k', '1e6' → bytes (decimal units; KiB/MiB/GiB binary)."""
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?(?:e\d+)?)\s*([kmgt]?)(i?)b?\s*", str(text).lower())
    if not m:
        raise ConfigError(f"shard_size must be a size like 500MB, 2GB or 64KB, got {text!r}", field="shard_size")
    base = 1024 if m.group(3) else 1000
    n = int(float(m.group(1)) * base ** " kmgt".index(m.group(2) or " "))
    if n < 1024:
        raise ConfigError(f"shard_size must be at least 1KB, got {text!r}", field="shard_size")
    return n


# ---- the split and the set, as _info.json describes them --------------------------------------------------------
@dataclass
class ShardSplit:
    """One split's shards: where each is (a path or a URL WebDataset opens), its sample count, sha256, bytes."""

    name: str
    urls: List[str]
    lengths: List[int]
    sha256: List[Optional[str]]
    sizes: List[Optional[int]]

    @property
    def num_samples(self) -> int:
        return int(sum(self.lengths))

    def __len__(self) -> int:
        return len(self.urls)


@dataclass
class ShardSet:
    """Shards opened and checked against their `_info.json`: the training split (the shards given) and the held-out
    one, class names, and the training data's profile when `_info.json` records it."""

    where: str
    info: dict
    train: ShardSplit
    val: Optional[ShardSplit]
    class_names: List[str]
    held_out_is_test: bool = False
    profile_dict: Optional[dict] = None


def _local(url: str) -> Optional[Path]:
    """The path of a local shard ('file:' URLs included), None for remote or piped ones."""
    if url.startswith("file:"):
        return Path(url[5:])
    if re.match(r"^[a-z][a-z0-9+.-]*:", url) and not re.match(r"^[a-zA-Z]:[\\/]", url):
        return None
    return Path(url)


def _expand(spec: str) -> List[str]:
    """A shard spec → shard URLs: a comma list, a brace pattern (`x-{000000..000009}.tar`), or one path."""
    if "," in spec and "{" not in spec:
        return [s.strip() for s in spec.split(",") if s.strip()]
    return list(_wds().shardlists.expand_urls(spec))


def open_shards(spec: str, verify: Optional[bool] = None) -> ShardSet:
    """Open `wds:` shards (the part after `wds:`): a folder with `_info.json`, a brace pattern or a comma list of
    shards (whose `_info.json` is the one beside the first). Checks `_info.json` against the shards (see the module
    docstring); `verify` forces (True) or skips (False) the up-front checksum and count."""
    spec = spec.strip()
    if not spec:
        raise DataError("wds: needs shards: wds:DIR (written by `vitkit shards`), wds:DIR/train-{000000..000009}.tar "
                        "or wds:a.tar,b.tar")
    p = Path(spec).expanduser()
    listed: Optional[List[str]] = None
    if p.is_dir():
        root = p
    else:
        listed = _expand(spec)
        if not listed:
            raise DataError(f"wds:{spec} names no shards")
        first = _local(listed[0])
        if first is None:
            raise DataError(f"wds:{spec}: remote shards need a local _info.json; put the shards in a folder with "
                            "their _info.json, or list local paths")
        root = first.expanduser().parent
    info_path = root / INFO_FILE
    if not info_path.is_file():
        raise DataError(f"no {INFO_FILE} in {str(root)!r}: vitkit streams shards described by one (num_samples, "
                        "filenames, shard_lengths per split, as `vitkit shards` writes them); write the shards with "
                        "`vitkit shards SOURCE --out DIR`")
    try:
        info = json.loads(info_path.read_text())
        splits = info["splits"]
        assert isinstance(splits, dict) and splits
    except (OSError, ValueError, KeyError, AssertionError, TypeError) as e:
        raise DataError(f"{str(info_path)!r} is not a shard description (expected JSON with 'splits'; "
                        f"{type(e).__name__}); rewrite it with `vitkit shards`") from None
    parsed = {name: _parse_split(name, s, root, info_path) for name, s in splits.items()}
    train_name = "train" if "train" in parsed else next(iter(parsed))
    if listed is None:
        train = parsed[train_name]
        _check_folder(root, parsed, info_path)
    else:
        train = _subset(listed, parsed, info_path)
    val = parsed.get("validation") or parsed.get("val") or parsed.get("test")
    if val is not None and val.name == train.name:
        val = train  # a held-out split given by pattern: it is what evaluation reads
    for split in {id(s): s for s in (train, val) if s is not None}.values():
        _check_split(split, info_path, verify)
    names = info.get("class_names") or [str(i) for i in range(int(info.get("num_classes") or 0))]
    if not names:
        raise DataError(f"{str(info_path)!r} names no classes (class_names or num_classes); rewrite it with "
                        "`vitkit shards`")
    where = str(root) if listed is None else spec
    return ShardSet(where, info, train, val, [str(n) for n in names], bool(info.get("held_out_is_test", False)),
                    info.get("profile"))


def _parse_split(name: str, s: dict, root: Path, info_path: Path) -> ShardSplit:
    try:
        files, lengths = list(s["filenames"]), [int(n) for n in s["shard_lengths"]]
        num = int(s["num_samples"])
    except (KeyError, TypeError, ValueError):
        raise DataError(f"{str(info_path)!r}: split {name!r} lacks num_samples, filenames or shard_lengths; "
                        "rewrite it with `vitkit shards`") from None
    sha = list(s.get("sha256") or [None] * len(files))
    sizes = list(s.get("bytes") or [None] * len(files))
    if not (len(files) == len(lengths) == len(sha) == len(sizes)):
        raise DataError(f"{str(info_path)!r}: split {name!r} lists {len(files)} shards but {len(lengths)} "
                        f"shard_lengths ({len(sha)} checksums); the file does not describe these shards")
    if sum(lengths) != num:
        raise DataError(f"{str(info_path)!r}: split {name!r} says num_samples {num} but its shard_lengths add up "
                        f"to {sum(lengths)}; the file does not describe these shards")
    urls = [f if _local(f) is None else str(root / f) for f in files]
    return ShardSplit(name, urls, lengths, sha, sizes)


def _subset(listed: List[str], parsed: Dict[str, ShardSplit], info_path: Path) -> ShardSplit:
    """The shards a pattern or list names, with their lengths and checksums from the split that holds them."""
    by_name = {}
    for split in parsed.values():
        for i, u in enumerate(split.urls):
            by_name[os.path.basename(u)] = (split, i)
    picked = []
    for u in listed:
        hit = by_name.get(os.path.basename(u))
        if hit is None:
            raise DataError(f"shard {u!r} is not listed in {str(info_path)!r}; the file does not describe these "
                            "shards (rewrite them with `vitkit shards`)")
        picked.append(hit)
    names = {s.name for s, _ in picked}
    if len(names) > 1:
        raise DataError(f"the shards given mix the splits {sorted(names)} of {str(info_path)!r}; give one split's")
    split = picked[0][0]
    return ShardSplit(split.name, list(listed), [split.lengths[i] for _, i in picked],
                      [split.sha256[i] for _, i in picked], [split.sizes[i] for _, i in picked])


def _check_folder(root: Path, parsed: Dict[str, ShardSplit], info_path: Path) -> None:
    """A folder's .tar files and the shards `_info.json` lists are the same set."""
    listed = {os.path.basename(u) for s in parsed.values() for u in s.urls}
    stray = sorted(p.name for p in root.glob("*.tar") if p.name not in listed)
    if stray:
        raise DataError(f"{str(root)!r} holds {len(stray)} shard(s) that {INFO_FILE} does not list ({stray[0]}...); "
                        "the file does not describe these shards: rewrite them with `vitkit shards`")


def _check_split(split: ShardSplit, info_path: Path, verify: Optional[bool]) -> None:
    """Every local shard present with its recorded size; small sets (or `verify`) also checksummed and counted."""
    total = 0
    for u, size in zip(split.urls, split.sizes):
        path = _local(u)
        if path is None:
            continue
        if not path.is_file():
            raise DataError(f"shard {u!r} listed in {str(info_path)!r} is missing; copy it back or rewrite the shards")
        actual = path.stat().st_size
        if size is not None and actual != size:
            raise DataError(f"shard {u!r} has {actual} bytes but {str(info_path)!r} says {size}; the shard changed "
                            "or is incomplete: copy it again or rewrite the shards")
        total += actual
    if verify is False or (verify is None and total > VERIFY_UPFRONT_BYTES):
        return
    for u, n, sha in zip(split.urls, split.lengths, split.sha256):
        if _local(u) is None:
            continue
        digest, count = _read_shard(u)
        _compare(u, n, sha, count, digest, info_path)


def _compare(url: str, expect_n: int, expect_sha: Optional[str], count: int, digest: str, info_path) -> None:
    if count != expect_n:
        raise DataError(f"shard {url!r} holds {count} samples but {str(info_path)!r} says {expect_n}; the file does "
                        "not describe these shards: rewrite them with `vitkit shards`")
    if expect_sha and digest != expect_sha:
        raise DataError(f"shard {url!r} fails its sha256 check ({digest[:12]}... vs {expect_sha[:12]}... in "
                        f"{str(info_path)!r}): the shard is damaged or was changed; copy it again")


def _read_shard(url: str) -> Tuple[str, int]:
    """(sha256, number of samples) of one shard, read through once."""
    n = 0
    it = _ShardReader(url)
    for _ in it:
        n += 1
    return it.digest, n


class _HashReader(io.RawIOBase):
    """A read-only stream that hashes what passes through it (the shard's sha256 as it is read)."""

    def __init__(self, raw):
        self.raw, self.h = raw, hashlib.sha256()

    def readable(self) -> bool:
        return True

    def readinto(self, b) -> int:
        data = self.raw.read(len(b))
        n = len(data)
        b[:n] = data
        self.h.update(data)
        return n

    def drain(self) -> str:
        while True:
            data = self.raw.read(1 << 20)
            if not data:
                break
            self.h.update(data)
        return self.h.hexdigest()


class _ShardReader:
    """The samples of one shard (dicts of key → bytes, as WebDataset groups them); once read through, `digest` is
    its sha256. A shard that is not a readable tar is a DataError naming it."""

    def __init__(self, url: str):
        self.url, self.digest = url, ""

    def __iter__(self) -> Iterator[dict]:
        wds = _wds()
        from webdataset.tariterators import group_by_keys, tar_file_iterator

        try:
            raw = wds.gopen(self.url)
        except (OSError, ValueError) as e:
            raise DataError(f"cannot open shard {self.url!r}: {e}") from None
        stream = _HashReader(raw)
        try:
            files = ({**f, "__url__": self.url} for f in tar_file_iterator(io.BufferedReader(stream, 1 << 20)))
            yield from group_by_keys(files)
            self.digest = stream.drain()
        except DataError:
            raise
        except Exception as e:  # noqa: BLE001 - a truncated or garbled tar: the shard is damaged
            raise DataError(f"shard {self.url!r} is not a readable tar ({type(e).__name__}: "
                            f"{str(e).splitlines()[0] if str(e) else ''}); copy it again or rewrite the shards") \
                from None
        finally:
            raw.close()


# ---- which shards each stream reads ----------------------------------------------------------------------------
def epoch_shards(n_shards: int, *, seed: int, epoch: int, streams: int, train: bool) -> Tuple[List[List[int]], bool]:
    """The shard indices each of the `streams` streams reads in `epoch` (stream g: every `streams`-th shard of the
    order, from the g-th), and whether the epoch is resampled (fewer shards than streams: each stream then draws
    shards with replacement, and the lists are empty). Training shuffles the order by (seed, epoch); evaluation
    keeps it."""
    n = max(1, streams)
    order = list(range(n_shards))
    if train:
        random.Random(_mix(seed, epoch, 1)).shuffle(order)
        if n_shards < n:
            return [[] for _ in range(n)], True
    return [order[g::n] for g in range(n)], False


def stream_count(streams: Optional[int], world: int, workers: int) -> int:
    """The shard streams of a training run: `streams` when given, else processes × workers (one stream per
    reader, as many as the first launch reads at once); a ConfigError when the processes cannot share them."""
    import math

    n = int(streams) if streams else world * max(1, workers)
    if n < 1 or n % world:
        raise ConfigError(f"{n} shard streams do not divide over {world} processes (each process reads as many): "
                          f"run in a number of processes that divides {n}, or start the run with --streams a "
                          f"multiple of every process count it will run on (e.g. {math.lcm(n, world)})",
                          field="streams")
    return n


# ---- the datasets the loader reads -----------------------------------------------------------------------------
class ShardDataset:
    """One split of a shard set, shaped for a model: images decoded to uint8 (C, side, side) in the workers, then
    `transform` (a `BatchTransform`) on whole batches, as for in-memory data. `len()` is the samples per epoch."""

    def __init__(self, split: ShardSplit, num_classes: int, in_chans: int, side: int, transform=None,
                 info_path: str = ""):
        self.split, self.num_classes, self.in_chans, self.side = split, num_classes, in_chans, side
        self.transform, self.info_path = transform, info_path
        self.limit: Optional[int] = None  # max_train / max_val: an epoch of this many samples
        self.label_map: Optional[List[int]] = None  # the data's class index → the checkpoint's (evaluation)
        self.skipped = 0  # bad samples left out so far (this process)
        self.skipped_keys: List[str] = []

    def __len__(self) -> int:
        n = self.split.num_samples
        return min(n, self.limit) if self.limit else n

    def limited(self, n: Optional[int]) -> "ShardDataset":
        """This split with epochs of at most `n` samples (quick runs): the start of each epoch's stream."""
        if n is not None:
            if n < 1:
                raise ConfigError(f"a dataset limit must be >= 1, got {n}")
            self.limit = n if n < self.split.num_samples else None
        return self

    def relabel(self, lut: Sequence[int]) -> "ShardDataset":
        self.label_map = None if list(lut) == list(range(len(lut))) else list(lut)
        return self

    def count_bad(self, bad: List[Tuple[str, str]]) -> None:
        for key, why in bad:
            if len(self.skipped_keys) < 100:
                self.skipped_keys.append(key)
            if self.skipped < 5:
                log.warning("skipping a bad sample %s: %s", key, why)
            self.skipped += 1


def _decode(sample: dict, in_chans: int, side: int, num_classes: int, label_map) -> Tuple[np.ndarray, int]:
    """A raw sample → ((C, side, side) uint8, label), or ValueError saying why it is bad."""
    from .folders import square_resize
    from .images import read_image

    if "cls" not in sample:
        raise ValueError("no .cls (class index)")
    try:
        y = int(sample["cls"])
    except ValueError:
        raise ValueError(f".cls is not a class index ({sample['cls'][:20]!r})") from None
    if not 0 <= y < num_classes:
        raise ValueError(f"class index {y} outside the {num_classes} classes")
    key = next((k for k in IMAGE_KEYS if k in sample), None)
    if key is None:
        raise ValueError(f"no image ({'|'.join(IMAGE_KEYS)})")
    try:
        im = read_image(io.BytesIO(sample[key]), in_chans, draft_size=side)
    except (DataError, OSError) as e:
        raise ValueError(f"the .{key} does not decode ({str(e).split(': ', 1)[-1][:80]})") from None
    return square_resize(im, side), (label_map[y] if label_map is not None else y)


class ShardLoader:
    """Batches (x, y) of one epoch of a `ShardDataset`; see the module docstring for the order. `batch_size` is the
    global batch (each process gets its streams' part of it); `streams` (training) the run's number of shard
    streams (`stream_count`); `start_batch` resumes mid-epoch; `len()` is the whole epoch's step count either way.
    `drop_last` is accepted as `Loader` takes it: a training epoch here is always whole steps, an evaluation pass
    every sample."""

    def __init__(self, dataset: ShardDataset, batch_size: int, *, train: bool, seed: int = 0, epoch: int = 0,
                 rank: int = 0, world: int = 1, workers: int = 0, drop_last: Optional[bool] = None, mixup=None,
                 start_step: int = 0, total_steps: Optional[int] = None, accum_steps: int = 1, start_batch: int = 0,
                 streams: Optional[int] = None):
        self.ds, self.bs, self.train, self.seed, self.epoch = dataset, batch_size, train, seed, epoch
        self.rank, self.world, self.workers, self.mixup = rank, world, workers, mixup
        self.start_step, self.total_steps, self.accum_steps = start_step, total_steps, max(1, accum_steps)
        self.start_batch = int(start_batch)
        n_shards = len(dataset.split)
        if train:
            n = self.n_streams = stream_count(streams, world, workers)
            # stream g's samples in every global batch and where they sit in it: bs // n each, one more for the
            # first bs % n streams (the processes' shares stay equal: they divide both bs and n)
            self.take = [batch_size // n + (g < batch_size % n) for g in range(n)]
            self.offset = [sum(self.take[:g]) for g in range(n)]
            mine = list(range(rank, n, world))  # this process's streams
            readers = min(max(1, workers), len(mine))
            self.readers = [mine[r::readers] for r in range(readers)]  # each DataLoader worker's streams
            self.local_bs = sum(self.take[g] for g in mine)
            self.steps = max(1, len(dataset) // batch_size)
        else:  # every sample once, in shard order, over the workers; a limit reads one stream from the start
            n = self.n_streams = 1 if dataset.limit else max(1, min(max(1, workers), n_shards))
            self.readers = [[g] for g in range(n)]
            self.local_bs = batch_size
        self.shards, self.resampled = epoch_shards(n_shards, seed=seed, epoch=epoch, streams=n, train=train)
        if not train:
            counts = [len(self.ds)] if self.ds.limit else [sum(dataset.split.lengths[i] for i in s)
                                                           for s in self.shards]
            self.steps = sum(-(-c // batch_size) for c in counts)
        self.skipped = 0  # bad samples left out of this epoch's batches (this process)

    def __len__(self) -> int:
        return self.steps

    def progress(self, batch: int) -> float:
        if not self.total_steps:
            return 1.0
        return min(1.0, (self.start_step + batch // self.accum_steps) / self.total_steps)

    # -- in the workers ----------------------------------------------------------------------------------------
    def _raw(self, g: int) -> Iterator[dict]:
        """Stream `g`'s raw samples (undecoded): its shards pass after pass (training: through a shuffle buffer
        seeded by (seed, epoch, g); resampled: shards drawn with replacement), or its shards once (evaluation)."""
        split = self.ds.split
        if not self.train:
            for i in self.shards[g]:
                yield from self._shard(i)
            return

        from webdataset.filters import _shuffle

        if self.resampled:
            pick = random.Random(_mix(self.seed, self.epoch, g, 7))

            def drawn():
                while True:
                    yield from self._shard(pick.randrange(len(split)))

            yield from _shuffle(drawn(), SHUFFLE_BUFFER, SHUFFLE_INITIAL,
                                rng=random.Random(_mix(self.seed, self.epoch, g, 3)))
            return
        mine, p = list(self.shards[g]), 0
        while mine:  # pass after pass, each shuffled on its own: the first pass holds every sample once
            stream = (s for i in mine for s in self._shard(i))
            yield from _shuffle(stream, SHUFFLE_BUFFER, SHUFFLE_INITIAL,
                                rng=random.Random(_mix(self.seed, self.epoch, g, 3, p)))
            p += 1
            random.Random(_mix(self.seed, self.epoch, g, p)).shuffle(mine)  # the next pass's shard order

    def _shard(self, i: int) -> Iterator[dict]:
        """Shard i's samples; when read through, checked against `_info.json` (count, sha256)."""
        split = self.ds.split
        reader = _ShardReader(split.urls[i])
        n = 0
        for s in reader:
            n += 1
            yield s
        _compare(split.urls[i], split.lengths[i], split.sha256[i], n, reader.digest, self.ds.info_path)

    def _decoded(self, raw: Iterator[dict], n: int) -> Tuple[torch.Tensor, torch.Tensor, list, int]:
        """The next `n` samples of `raw` decoded: (uint8 images, labels, bad samples [(key, why)], samples read)."""
        ds = self.ds
        xs, ys, bad, read = [], [], [], 0
        for _ in range(n):
            s = next(raw, None)
            if s is None:
                break
            read += 1
            try:
                x, y = _decode(s, ds.in_chans, ds.side, ds.num_classes, ds.label_map)
                xs.append(x)
                ys.append(y)
            except ValueError as e:
                bad.append((f"{os.path.basename(s.get('__url__', '?'))}:{s.get('__key__', '?')}", str(e)))
        x = torch.from_numpy(np.stack(xs)) if xs else torch.zeros((0, ds.in_chans, ds.side, ds.side), dtype=torch.uint8)
        return x, torch.tensor(ys, dtype=torch.long), bad, read

    def _reader_items(self, r: int) -> Iterator[dict]:
        """Reader (DataLoader worker) `r`'s items; a DataError becomes a `fault` item (raised as one line in the main
        process)."""
        try:
            yield from self._train_parts(r) if self.train else self._eval_batches(r)
        except DataError as e:
            yield {"fault": str(e)}

    def _train_parts(self, r: int) -> Iterator[dict]:
        """For each batch from `start_batch` on, reader `r`'s part of it: its streams' samples, decoded."""
        raws = {}
        for g in self.readers[r]:
            raws[g] = self._raw(g)
            for _ in range(self.start_batch * self.take[g]):  # the batches before, replayed without decoding
                if next(raws[g], None) is None:
                    break
        for j in range(self.start_batch, self.steps):
            parts = []
            for g in self.readers[r]:
                x, y, bad, _ = self._decoded(raws[g], self.take[g])
                parts.append({"stream": g, "x": x, "y": y, "bad": bad})
            yield {"index": j, "parts": parts}

    def _eval_batches(self, r: int) -> Iterator[dict]:
        """Evaluation: stream `r`'s samples in batches until it ends (or the dataset's limit)."""
        raw, limit, seen = self._raw(r), (len(self.ds) if self.ds.limit else None), 0
        while True:
            x, y, bad, read = self._decoded(raw, self.bs if limit is None else min(self.bs, limit - seen))
            seen += read
            if read == 0:
                return
            if not len(y):
                self._no_image(bad)
            yield {"x": x, "y": y, "bad": bad}
            if limit is not None and seen >= limit:
                return

    @staticmethod
    def _no_image(bad: list):
        raise DataError(f"none of the {len(bad)} samples of a batch decodes (e.g. {bad[0][0]}: {bad[0][1]}); the "
                        "shards are damaged: rewrite them with `vitkit shards`")

    # -- in the main process -----------------------------------------------------------------------------------
    def _items(self) -> Iterator[dict]:
        """The readers' items: in-process without workers, else through a DataLoader (worker r is reader r)."""
        if self.workers <= 0:
            yield from self._reader_items(0)
            return
        dl = torch.utils.data.DataLoader(_Stream(self), batch_size=None, num_workers=len(self.readers),
                                         generator=torch.Generator().manual_seed(_mix(self.seed, self.epoch, 5)),
                                         persistent_workers=False)
        yield from dl

    def __iter__(self) -> Iterator[Tuple[torch.Tensor, torch.Tensor]]:
        pending: Dict[int, list] = {}
        n_mine = sum(len(s) for s in self.readers)
        for item in self._items():
            if "fault" in item:
                raise DataError(item["fault"])
            if not self.train:
                yield self._finish(item["x"], item["y"], item["bad"], None, None)
                continue
            parts = pending.setdefault(item["index"], [])
            parts += item["parts"]
            if len(parts) == n_mine:  # every stream's part is in (each reader delivers its batches in order)
                yield self._assemble(item["index"], sorted(pending.pop(item["index"]), key=lambda p: p["stream"]))
        if self.skipped:
            log.warning("left out %d bad sample(s) of %s in epoch %d (%d so far)", self.skipped,
                        self.ds.split.name, self.epoch + 1, self.ds.skipped)

    def _assemble(self, step: int, parts: List[dict]):
        """Batch `step` of this process from its streams' parts, each at its own place in the global batch (so the
        augmentation drawn for a sample does not depend on how the streams are spread over processes)."""
        x = torch.cat([p["x"] for p in parts])
        y = torch.cat([p["y"] for p in parts])
        bad = [b for p in parts for b in p["bad"]]
        if not len(y):
            self._no_image(bad)
        where = torch.cat([torch.arange(self.offset[p["stream"]], self.offset[p["stream"]] + len(p["y"]))
                           for p in parts])
        return self._finish(x, y, bad, step, where)

    def _finish(self, x: torch.Tensor, y: torch.Tensor, bad: list, step: Optional[int], where):
        if bad:
            self.skipped += len(bad)
            self.ds.count_bad(bad)
        gen = torch.Generator().manual_seed(_mix(self.seed, self.epoch, step if step is not None else 0, 11))
        p = self.progress(step) if step is not None else 1.0
        tf = self.ds.transform
        if tf is not None:
            x = tf(x, gen, where if self.train else 0, self.bs if self.train else len(x), progress=p)
        else:
            x = x.float() / 255
        if self.mixup is not None and self.train:
            x, y = self.mixup(x, y, gen, progress=p)
        return x, y


class _Stream(torch.utils.data.IterableDataset):
    """The DataLoader's view of a ShardLoader: each worker yields its reader's items."""

    def __init__(self, loader: ShardLoader):
        super().__init__()
        self.loader = loader

    def __iter__(self):
        wi = torch.utils.data.get_worker_info()
        return self.loader._reader_items(wi.id if wi is not None else 0)


# ---- writing ---------------------------------------------------------------------------------------------------
@dataclass
class _Item:
    """One sample to write: the source (a file or a uint8 array) and its label."""

    label: int
    path: Optional[str] = None
    array: Optional[np.ndarray] = None  # (C, H, W) uint8
    size: Tuple[int, int] = (0, 0)  # files: (width, height) as shown, from the scan's header read
    grey: bool = False  # files: a grey Pillow mode (kept grey when re-encoded)


def _encode(item: _Item, resize: Optional[int]) -> Tuple[bytes, str, Tuple[int, int]]:
    """(image bytes, extension, (width, height)): JPEG/PNG files as they are; other files, arrays and resized
    images encoded (PNG, or JPEG q95 for JPEG sources), the shorter side brought down to `resize`."""
    from PIL import Image

    if item.path is not None:
        ext = os.path.splitext(item.path)[1].lower()
        kind = {".jpg": "jpg", ".jpeg": "jpg", ".png": "png"}.get(ext)
        if kind and not resize:
            return Path(item.path).read_bytes(), kind, item.size
        from .images import read_image

        im = read_image(item.path, 1 if item.grey else 3)
        fmt = "jpg" if kind == "jpg" else "png"
    else:
        a = item.array
        im = Image.fromarray(a[0] if a.shape[0] == 1 else a.transpose(1, 2, 0), "L" if a.shape[0] == 1 else "RGB")
        fmt = "png"
    if resize and min(im.size) > resize:
        s = resize / min(im.size)
        im = im.resize((max(1, round(im.size[0] * s)), max(1, round(im.size[1] * s))), Image.BICUBIC)
    buf = io.BytesIO()
    if fmt == "jpg":
        im.save(buf, "JPEG", quality=95)
    else:
        im.save(buf, "PNG")
    return buf.getvalue(), fmt, im.size


_GREY_MODES = ("1", "L", "LA", "La", "I", "I;16", "I;16L", "I;16B", "I;16N", "F")


def _items_of(src, which: str) -> Tuple[List[_Item], List[str]]:
    """A DataSource split ('train' | 'val') as items to write, with each item's name (its file, or its index)."""
    if src.scan is not None:
        idx = src.train_idx if which == "train" else src.val_idx
        root = src.scan.root
        sc = src.scan
        items = [_Item(int(sc.labels[i]), path=sc.files[i], size=tuple(int(v) for v in sc.sizes[i]),
                       grey=sc.modes[i] in _GREY_MODES) for i in idx]
        return items, [os.path.relpath(it.path, root) for it in items]
    ds = src.train if which == "train" else src.val
    arr = ds.images.numpy()
    return [_Item(int(y), array=arr[i]) for i, y in enumerate(ds.labels.tolist())], \
        [f"{src.spec}:{which}:{i}" for i in range(len(ds))]


def _size_stats(sizes: List[Tuple[int, int]]) -> dict:
    """The stored images' size distribution: width/height quantiles and the most common sizes."""
    from collections import Counter

    a = np.asarray(sizes, np.int64).reshape(-1, 2)
    q = lambda v: {k: int(np.percentile(v, p)) for k, p in (("min", 0), ("p5", 5), ("median", 50),  # noqa: E731
                                                             ("p95", 95), ("max", 100))}
    common = Counter(f"{w}x{h}" for w, h in sizes).most_common(10)
    return {"count": len(sizes), "width": q(a[:, 0]), "height": q(a[:, 1]), "most_common": dict(common)}


def write_shards(source: str, out, *, shard_size="500MB", resize: Optional[int] = None, seed: int = 0,
                 data_dir="data", download: bool = False, val_split: float = 0.1, strict: bool = False,
                 progress: bool = True, max_count: Optional[int] = None) -> dict:
    """Write a data set (any `--data` spec, or a folder path) as WebDataset shards in `out` (which must not exist or
    be empty): `train-NNNNNN.tar` in a seeded shuffled order (so every shard mixes the classes),
    `validation-NNNNNN.tar`, and `_info.json` (see the module docstring). Returns the `_info.json` content.
    The shards are written into a temporary folder beside `out` and renamed into place at the end. `max_count`: at
    most this many samples per shard as well (equal shards, e.g. for as many shards as processes × workers)."""
    from . import open_data

    wds = _wds()
    out = Path(out).expanduser()
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ConfigError(f"out: {str(out)!r} exists and is not empty; shards are never written over: choose a "
                          "new folder or remove it", field="out")
    maxsize = parse_size(shard_size)
    if resize is not None and (not isinstance(resize, int) or resize < 1):
        raise ConfigError(f"resize must be a positive number of pixels, got {resize!r}", field="resize")
    spec = str(source)
    if not spec.startswith(("folder:", "wds:")) and Path(spec).expanduser().is_dir():
        spec = f"folder:{spec}"
    if spec.startswith("wds:"):
        raise ConfigError("source is already shards (wds:); give a folder or a built-in data set", field="source")
    src = open_data(spec, data_dir=data_dir, download=download, val_split=val_split, seed=seed, strict=strict)
    profile = src.profile()
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".partial", dir=out.parent))
    splits, sizes_seen, bad_files = {}, [], []
    bar = None
    total = src.num_train + src.num_val
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=total, unit="img", desc=f"writing shards of {src.info.spec}", dynamic_ncols=True,
                   mininterval=0.5)
    try:
        for which, split_name in (("train", "train"), ("val", "validation")):
            items, names = _items_of(src, which)
            order = list(range(len(items)))
            if which == "train":
                random.Random(seed).shuffle(order)
            counts: Dict[str, int] = {}
            pattern = str(tmp / f"{split_name}-%06d.tar")
            # a whole-second mtime: no PAX header per member (half the tar parsing when read), and the same
            # bytes (and sha256) each time the same data is written
            with wds.ShardWriter(pattern, maxsize=maxsize, maxcount=max_count or 10**9, verbose=0,
                                 mtime=SHARD_MTIME) as sink:
                k = 0
                for i in order:
                    try:
                        data, ext, wh = _encode(items[i], resize)
                    except (DataError, OSError, ValueError) as e:
                        if strict:
                            raise DataError(f"cannot write {names[i]!r}: {e}") from None
                        bad_files.append(names[i])
                        log.warning("leaving out %s: %s", names[i], e)
                        continue
                    sink.write({"__key__": f"{k:06d}", ext: data, "cls": str(items[i].label),
                                "json": json.dumps({"filename": names[i]})})
                    counts[os.path.basename(sink.fname)] = counts.get(os.path.basename(sink.fname), 0) + 1
                    if which == "train":
                        sizes_seen.append(wh)
                    k += 1
                    if bar is not None:
                        bar.update(1)
            files = sorted(counts)
            digests = [hashlib.sha256((tmp / f).read_bytes()).hexdigest() for f in files]
            splits[split_name] = {"name": split_name, "num_samples": sum(counts.values()), "filenames": files,
                                  "shard_lengths": [counts[f] for f in files], "sha256": digests,
                                  "bytes": [(tmp / f).stat().st_size for f in files]}
        prof = profile.to_dict()
        if sizes_seen:  # what is stored (after --resize): median (height, width) and the side range
            a = np.asarray(sizes_seen)
            prof["native_size"] = [int(np.median(a[:, 1])), int(np.median(a[:, 0]))]
            prof["size_range"] = [int(a.min()), int(a.max())]
        prof["num_train"], prof["num_val"] = splits["train"]["num_samples"], splits["validation"]["num_samples"]
        info = {"name": out.name, "format": "webdataset", "vitkit_shards": FORMAT_VERSION, "source": src.info.spec,
                "num_classes": len(src.info.class_names), "class_names": list(src.info.class_names),
                "held_out_is_test": bool(src.held_out_is_test), "split_note": src.info.note,
                "resize": resize, "shard_size": maxsize, "seed": seed,
                "splits": splits,
                "image_stats": {"sizes": _size_stats(sizes_seen) if sizes_seen else {}, "mean": profile.mean,
                                "std": profile.std, "channels": profile.in_chans, "grey": profile.grey,
                                "measured_on": profile.sample_size},
                "profile": prof, "left_out": bad_files[:100], "left_out_count": len(bad_files)}
        (tmp / INFO_FILE).write_text(json.dumps(info, indent=1) + "\n")
        if out.exists():
            out.rmdir()  # empty (checked above)
        os.replace(tmp, out)
    except BaseException:
        import shutil

        shutil.rmtree(tmp, ignore_errors=True)
        raise
    finally:
        if bar is not None:
            bar.close()
    return info


__all__ = ["INFO_FILE", "ShardSplit", "ShardSet", "ShardDataset", "ShardLoader", "open_shards", "write_shards",
           "epoch_shards", "stream_count", "parse_size"]
