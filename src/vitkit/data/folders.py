"""Image folders at speed: a scan that reads file listings and image headers only, and a decoded uint8 copy of
the images, made once in parallel and cached on disk under a key of the folder's listing.

    scan = scan_folder("~/photos")                      # classes, files, header sizes and modes; nothing decoded
    images, labels, bad = decode_folder(scan, size=32, in_chans=3)   # (N, C, 32, 32) uint8, cached

The cache key covers every file's path, size, modification and change times, the decoding options and the
image-reading policy's version (`vitkit.data.images.POLICY_VERSION`), so a changed policy or a changed,
added or removed file makes a new key: a cached copy is never served for a folder that has changed since. The cache
lives in `$VITKIT_CACHE` (default `~/.cache/vitkit`), one `.npy` + `.json` pair per (folder state, options).
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import tempfile
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np

from ..errors import DataError
from . import images as _images
from .images import IMG_EXTENSIONS, image_files, oriented_size

log = logging.getLogger(__name__)

CACHE_VERSION = 1


def _cache_tag() -> str:
    """The cache format's version and the image-reading policy's: a changed decoding never serves stale pixels."""
    return f"{CACHE_VERSION}.{_images.POLICY_VERSION}"
_PARALLEL_MIN = 2000  # below this many files, decoding in this process is faster than starting workers


def cache_dir() -> Path:
    """Where decoded folders are cached: $VITKIT_CACHE, else ~/.cache/vitkit."""
    return Path(os.environ.get("VITKIT_CACHE") or Path.home() / ".cache" / "vitkit")


@dataclass
class FolderScan:
    """What a scan of `root/<class>/*` (or `root/train|val/<class>/*`) found, without decoding a pixel.
    `files[i]` has label `labels[i]`, header size `sizes[i]` = (width, height) and Pillow mode `modes[i]`;
    `split[i]` is 'train' or 'val' when the folder is split on disk (train/ + val/ or test/), else ''."""

    root: Path
    classes: List[str]
    files: List[str]
    labels: np.ndarray
    sizes: np.ndarray
    modes: List[str]
    split: List[str]
    skipped: List[str] = field(default_factory=list)  # files whose header Pillow cannot read
    held_out_dir: str = ""  # the on-disk held-out folder's name ('val', 'test', ...), if any

    def __len__(self) -> int:
        return len(self.files)

    def listing_key(self, **options) -> str:
        """A key that changes when any file changes (path, size, mtime, ctime) or any decoding option does."""
        h = hashlib.sha256(f"v{_cache_tag()}|{self.root.resolve()}|{json.dumps(options, sort_keys=True)}".encode())
        for f in self.files:
            st = os.stat(f)
            h.update(f"{f}\0{st.st_size}\0{st.st_mtime_ns}\0{st.st_ctime_ns}\n".encode())
        return h.hexdigest()[:32]


def _list_classes(root: Path) -> List[str]:
    return sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))


def _headers(files: Sequence[str]) -> List[Optional[Tuple[int, int, str]]]:
    """(width, height, mode) from each file's header, or None where Pillow cannot identify the file."""
    from PIL import Image

    out: List[Optional[Tuple[int, int, str]]] = []
    for f in files:
        try:
            with Image.open(f) as im:
                out.append((*oriented_size(im), im.mode))
        except Exception:  # noqa: BLE001 - any unreadable header: the file is skipped and counted
            out.append(None)
    return out


def scan_folder(path, strict: bool = False) -> FolderScan:
    """List a folder of class sub-folders and read each image's header (size, mode) — no decoding. Files whose
    header cannot be read are skipped and counted (`strict` stops at the first)."""
    root = Path(path).expanduser()
    if not root.exists():
        raise FileNotFoundError(f"image folder {str(root)!r} does not exist; check the path in --data folder:PATH")
    if not root.is_dir():
        raise DataError(f"{str(root)!r} is not a folder; --data folder:PATH wants PATH/<class>/* or "
                        "PATH/train/<class>/* + PATH/val/<class>/*")
    held = next((n for n in ("val", "valid", "validation", "test") if (root / n).is_dir()), None)
    if (root / "train").is_dir() and held is not None:
        classes = _list_classes(root / "train")
        if not classes:
            raise DataError(f"{str(root / 'train')!r} has no class folders; put images in train/<class>/")
        parts = [("train", root / "train"), ("val", root / held)]
    else:
        held = None
        classes = _list_classes(root)
        if not classes:
            raise DataError(f"{str(root)!r} has no class folders; put the images in PATH/<class>/ (one folder per "
                            "class) or PATH/train/<class>/ and PATH/val/<class>/")
        if len(classes) < 2:
            raise DataError(f"{str(root)!r} has one class folder ({classes[0]}); a classifier needs at least two")
        parts = [("", root)]
    files, labels, split = [], [], []
    for name, base in parts:
        for ci, c in enumerate(classes):
            d = base / c
            if not d.is_dir():
                raise DataError(f"class folder {str(d)!r} is missing: {str(base)!r} must hold the same class folders "
                                f"as the training split ({', '.join(classes)})")
            found = [str(f) for f in image_files(d)]  # vitkit.data's one listing rule
            if not found:
                raise DataError(f"class folder {str(d)!r} holds no images ({', '.join(IMG_EXTENSIONS)}); add images "
                                "or remove the folder")
            files += found
            labels += [ci] * len(found)
            split += [name] * len(found)
    heads = _cached_headers(root, files)
    keep = [i for i, h in enumerate(heads) if h is not None]
    skipped = [files[i] for i, h in enumerate(heads) if h is None]
    if skipped and strict:
        raise DataError(f"unreadable image {skipped[0]!r} (Pillow cannot identify it); fix or remove it, or drop "
                        "--strict to skip such files with a warning")
    for f in skipped[:5]:
        log.warning("skipping unreadable image %s", f)
    scan = FolderScan(root, classes, [files[i] for i in keep], np.asarray([labels[i] for i in keep], np.int64),
                      np.asarray([heads[i][:2] for i in keep], np.int64).reshape(-1, 2),
                      [heads[i][2] for i in keep], [split[i] for i in keep], skipped, held or "")
    for ci, c in enumerate(classes):
        for part in {s for s in scan.split}:
            if not any(lab == ci and s == part for lab, s in zip(scan.labels, scan.split)):
                raise DataError(f"class {c!r} has no readable images{f' in {part}/' if part else ''}; add images or "
                                "remove the folder")
    return scan


def _cached_headers(root: Path, files: List[str]) -> List[Optional[Tuple[int, int, str]]]:
    """Every file's header (width, height, mode), read once and cached under the listing's key (paths, sizes,
    modification and change times), so a rescan of an unchanged folder reads no image."""
    h = hashlib.sha256(f"headers v{_cache_tag()}|{root.resolve()}".encode())
    for f in files:
        st = os.stat(f)
        h.update(f"{f}\0{st.st_size}\0{st.st_mtime_ns}\0{st.st_ctime_ns}\n".encode())
    path = cache_dir() / "folders" / f"{h.hexdigest()[:32]}.headers.json"
    if path.is_file():
        try:
            heads = json.loads(path.read_text())
            if len(heads) == len(files):
                return [tuple(x) if x is not None else None for x in heads]
        except (OSError, ValueError):
            pass
    heads = _parallel(_headers, files, chunk=4096)
    _put_json(path, heads)
    return heads


def _put_json(path: Path, value) -> None:
    """Cache `value` as JSON at `path` through a temp file and a rename; a failure only costs the next run time."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        with os.fdopen(fd, "w") as f:
            f.write(json.dumps(value))
        os.replace(tmp, path)
    except OSError:
        pass


def _parallel(fn, items: Sequence, chunk: int):
    """`fn` over chunks of `items` in worker processes (all cores) when there are many, else here; results in order."""
    if len(items) < _PARALLEL_MIN or (os.cpu_count() or 1) < 2:
        return fn(items)
    chunks = [items[i:i + chunk] for i in range(0, len(items), chunk)]
    with _pool(len(chunks)) as ex:
        out = []
        for part in ex.map(fn, chunks):
            out += part
        return out


def _pool(n_jobs: int) -> ProcessPoolExecutor:
    """Worker processes for Pillow work: forked on Linux (as DataLoader workers are; the children run Pillow and
    numpy only, never OpenMP), spawned elsewhere."""
    import multiprocessing
    import sys

    ctx = multiprocessing.get_context("fork" if sys.platform.startswith("linux") else "spawn")
    return ProcessPoolExecutor(max_workers=max(1, min(n_jobs, os.cpu_count() or 1)), mp_context=ctx)


# ---- decoding ---------------------------------------------------------------------------------------------------
def _decode_chunk(args) -> Tuple[np.ndarray, List[int]]:
    """Decode files to (n, C, S, S) uint8 (shorter side resized to S, centre-cropped); indices of failures."""
    files, size, in_chans = args[:3]
    draft = len(args) > 3 and args[3]  # JPEGs may decode at a reduced scale (>= size): much faster for thumbnails
    from .images import read_image

    out = np.zeros((len(files), in_chans, size, size), np.uint8)
    bad = []
    for i, f in enumerate(files):
        try:
            im = read_image(f, in_chans, draft_size=size if draft else None)
            out[i] = square_resize(im, size)
        except Exception:  # noqa: BLE001 - the file is counted and skipped by the caller
            bad.append(i)
    return out, bad


def square_resize(im, size: int) -> np.ndarray:
    """A PIL image → (C, size, size) uint8: the shorter side resized to `size` (antialiased), centre-cropped."""
    from PIL import Image

    w, h = im.size
    if (w, h) != (size, size):
        s = size / min(w, h)
        nw, nh = max(size, round(w * s)), max(size, round(h * s))
        im = im.resize((nw, nh), Image.BICUBIC, reducing_gap=None if max(w / nw, h / nh) < 2 else 2.0)
        left, top = (nw - size) // 2, (nh - size) // 2
        im = im.crop((left, top, left + size, top + size))
    a = np.asarray(im, dtype=np.uint8)
    return a[None] if a.ndim == 2 else a.transpose(2, 0, 1)


def decode_folder(scan: FolderScan, size: int, in_chans: int, progress: bool = True,
                  use_cache: bool = True) -> Tuple[np.ndarray, np.ndarray, List[str]]:
    """Every scanned image as one uint8 array (N', C, size, size) with labels (N',), decoded in parallel once and
    then read from the cache; files that fail to decode are left out and returned by name (third item)."""
    key = scan.listing_key(size=size, in_chans=in_chans)
    base = cache_dir() / "folders"
    npy, meta = base / f"{key}.npy", base / f"{key}.json"
    if use_cache and npy.is_file() and meta.is_file():
        try:
            info = json.loads(meta.read_text())
            images = np.load(npy)
            if images.shape[0] == len(info["keep"]) and info["files"] == len(scan.files):
                log.info("decoded images from the cache (%s)", npy)
                keep = np.asarray(info["keep"], np.int64)
                return images, scan.labels[keep], [scan.files[i] for i in info["bad"]]
        except (OSError, ValueError, KeyError):
            log.warning("ignoring a damaged cache entry %s; decoding again", npy)
    n = len(scan.files)
    chunk = 512
    jobs = [(scan.files[i:i + chunk], size, in_chans, True) for i in range(0, n, chunk)]
    bar = None
    if progress and n >= _PARALLEL_MIN:  # a bar only where decoding takes noticeable time
        from tqdm.auto import tqdm

        bar = tqdm(total=n, unit="img", desc=f"decoding {scan.root.name}", dynamic_ncols=True, mininterval=0.5)
    parts: List[np.ndarray] = []
    bad: List[int] = []
    if n >= _PARALLEL_MIN and (os.cpu_count() or 1) > 1:
        with _pool(len(jobs)) as ex:
            results = ex.map(_decode_chunk, jobs)
            for j, (arr, b) in enumerate(results):
                parts.append(arr)
                bad += [j * chunk + i for i in b]
                if bar is not None:
                    bar.update(len(arr))
    else:
        for j, job in enumerate(jobs):
            arr, b = _decode_chunk(job)
            parts.append(arr)
            bad += [j * chunk + i for i in b]
            if bar is not None:
                bar.update(len(arr))
    if bar is not None:
        bar.close()
    images = np.concatenate(parts) if parts else np.zeros((0, in_chans, size, size), np.uint8)
    bad_set = set(bad)
    keep = [i for i in range(n) if i not in bad_set]
    images = images[keep] if bad else images
    for i in bad[:5]:
        log.warning("skipping an image that does not decode: %s", scan.files[i])
    if use_cache:
        _write_cache(npy, meta, images, {"root": str(scan.root), "files": n, "keep": keep, "bad": bad,
                                          "size": size, "in_chans": in_chans})
    return images, scan.labels[keep], [scan.files[i] for i in bad]


def cached_json(scan: FolderScan, name: str, make, **options):
    """A JSON-able result computed from a folder's files (e.g. its profile), cached under the folder's listing key:
    recomputed only when a file or an option changes."""
    path = cache_dir() / "folders" / f"{scan.listing_key(what=name, **options)}.{name}.json"
    if path.is_file():
        try:
            return json.loads(path.read_text())
        except (OSError, ValueError):
            pass
    value = make()
    _put_json(path, value)
    return value


def _write_cache(npy: Path, meta: Path, images: np.ndarray, info: Dict) -> None:
    """Write the cache pair atomically (temp files renamed); a failure to cache only costs the next run time."""
    try:
        npy.parent.mkdir(parents=True, exist_ok=True)
        for path, write in ((npy, lambda f: np.save(f, images)), (meta, lambda f: f.write(json.dumps(info).encode()))):
            fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
            with os.fdopen(fd, "wb") as f:
                write(f)
            os.replace(tmp, path)
    except OSError as e:
        log.warning("could not cache the decoded images in %s (%s); the next run decodes them again", npy.parent, e)
