"""Image folders at speed: a scan that reads file listings and image headers only, and a decoded uint8 copy of
the images, made once in parallel and cached on disk under a key of the folder's listing.

    scan = scan_folder("~/photos")                      # classes, files, header sizes and modes; nothing decoded
    images, labels, bad = decode_folder(scan, size=32, in_chans=3)   # (N, C, 32, 32) uint8, cached

The scan lists the class folders and reads the headers in worker processes, and keeps its listing (paths, stats,
headers) in one `.listing.npz` per folder: a rescan stats every file again but reads only the headers of added or
changed files (a million unchanged files rescan in seconds; see `_Listing` for the change test).

The decoded cache's key covers every file's path, size, modification and change times, the decoding options and the
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
import time
from concurrent.futures import ProcessPoolExecutor, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np

from ..errors import DataError
from ..runtime import cache_dir
from . import images as _images
from .images import IMG_EXTENSIONS, is_image_name, oriented_size

log = logging.getLogger(__name__)

CACHE_VERSION = 1


def _cache_tag() -> str:
    """The cache format's version and the image-reading policy's: a changed decoding never serves stale pixels."""
    return f"{CACHE_VERSION}.{_images.POLICY_VERSION}"
_PARALLEL_MIN = 2000  # below this many files, decoding in this process is faster than starting workers


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


def scan_folder(path, strict: bool = False, workers: Optional[int] = None, use_cache: bool = True) -> FolderScan:
    """List a folder of class sub-folders and read each image's header (size, mode) — no decoding. Files whose
    header cannot be read are skipped and counted (`strict` stops at the first).

    The listing (paths, sizes, times, headers) is cached per folder and reused for every file whose stat has not
    changed (see `_Listing`); the class folders are listed and the remaining headers read in parallel (`workers`
    processes; default: every core once the folder is large, 1 = all in this process)."""
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
    dirs, where = [], []
    for name, base in parts:
        for ci, c in enumerate(classes):
            d = base / c
            if not d.is_dir():
                raise DataError(f"class folder {str(d)!r} is missing: {str(base)!r} must hold the same class folders "
                                f"as the training split ({', '.join(classes)})")
            dirs.append(str(d))
            where.append((name, ci))
    started = time.time_ns()  # before any stat: what changes from here on is newer than the listing
    cached = _Listing.load(_listing_path(root), root) if use_cache else None
    list_workers = workers
    if workers is None:  # worker processes cost ~50 ms to start: only for folders that were (or look) large; a
        # folder's st_size grows ~20-24 bytes an entry on ext4, xfs and tmpfs
        expect = len(cached.files) if cached is not None else sum(os.stat(d).st_size for d in dirs) // 24
        list_workers = None if expect >= _PARALLEL_MIN else 1
    listed = _map(_list_dir, dirs, list_workers, pool=SCAN_POOL)  # the one listing rule, with each file's stat
    files: List[str] = []
    split: List[str] = []
    for d, (name, _), (found, _) in zip(dirs, where, listed):
        if not found:
            raise DataError(f"class folder {d!r} holds no images ({', '.join(IMG_EXTENSIONS)}); add images "
                            "or remove the folder")
        files += found
        split += [name] * len(found)
    labels = np.concatenate([np.full(len(found), ci, np.int64) for (_, ci), (found, _) in zip(where, listed)])
    stats = np.concatenate([st for _, st in listed])
    heads = _listing_headers(root, files, stats, started, cached, workers, use_cache)
    ok = heads.mode >= 0
    skipped = [files[i] for i in np.nonzero(~ok)[0]]
    if skipped and strict:
        raise DataError(f"unreadable image {skipped[0]!r} (Pillow cannot identify it); fix or remove it, or drop "
                        "--strict to skip such files with a warning")
    for f in skipped[:5]:
        log.warning("skipping unreadable image %s", f)
    if skipped:
        keep = np.nonzero(ok)[0]
        files, split = [files[i] for i in keep], [split[i] for i in keep]
    scan = FolderScan(root, classes, files, labels[ok], heads.wh[ok], [heads.modes[m] for m in heads.mode[ok]],
                      split, skipped, held or "")
    kept_split = np.asarray(scan.split)
    for part in dict.fromkeys(scan.split):  # every class needs a readable image in every split (one bincount each)
        counts = np.bincount(scan.labels[kept_split == part], minlength=len(classes))
        if not counts.all():
            c = classes[int(np.argmin(counts))]
            raise DataError(f"class {c!r} has no readable images{f' in {part}/' if part else ''}; add images or "
                            "remove the folder")
    return scan


# ---- the listing and its cache ----------------------------------------------------------------------------------
# Scanning many small files is bound by Pillow's header parsing, which holds the GIL: worker processes beat threads
# on 2 cores (benchmarks/scale.py --sections scan measures both), so both phases use processes.
SCAN_POOL = "process"
# A file whose times are this close to (or after) the moment its listing was taken has its header read again on the
# next scan: file times are coarse (a kernel tick; 2 s on FAT; a skewed clock over NFS), so a same-size rewrite right
# after a scan could otherwise keep the times the listing holds (git's "racily clean" entries).
RACY_NS = 2_000_000_000


def _list_dir(folder: str) -> Tuple[List[str], np.ndarray]:
    """Image files under `folder` by `images.image_files`'s rule (recursive, hidden names skipped, symlinked
    folders not followed, sorted by path) and their stats (n, 3): size, mtime_ns, ctime_ns (-1s where a dangling
    link cannot be stat'ed; its header read then fails and it is skipped and counted). One scandir per folder,
    one stat per file."""
    paths: List[str] = []
    stats: List[int] = []
    stack = [folder]
    while stack:
        with os.scandir(stack.pop()) as it:
            for e in it:
                if e.name.startswith("."):
                    continue
                if e.is_dir():
                    if not e.is_symlink():  # as os.walk(followlinks=False): a linked folder is not entered
                        stack.append(e.path)
                elif is_image_name(e.name):
                    paths.append(e.path)
                    try:
                        st = e.stat()
                        stats += (st.st_size, st.st_mtime_ns, st.st_ctime_ns)
                    except OSError:
                        stats += (-1, -1, -1)
    order = sorted(range(len(paths)), key=paths.__getitem__)
    return [paths[i] for i in order], np.asarray(stats, np.int64).reshape(-1, 3)[order]


@dataclass
class _Headers:
    """Per file (width, height) in `wh` (N, 2) and an index into `modes` in `mode` (N,); -1 where Pillow cannot read
    the header."""

    wh: np.ndarray
    mode: np.ndarray
    modes: List[str]


def _listing_path(root: Path) -> Path:
    h = hashlib.sha256(f"listing v{_cache_tag()}|{root.resolve()}".encode()).hexdigest()[:32]
    return cache_dir() / "folders" / f"{h}.listing.npz"


@dataclass
class _Listing:
    """The cached scan of one folder: every file's path, stat (size, mtime_ns, ctime_ns) and header, and when the
    listing was taken. A file's cached header is used when its path and stat are unchanged and its times are older
    than the listing by more than RACY_NS; added, removed and changed files are always seen, because every scan
    lists every folder and stats every file.

    Why stat every file (O(N) stats: ~1-3 s a million files) rather than trust the folders' mtimes (O(folders)): a
    folder's mtime changes when a file is added, removed or renamed in it, but not when a file is rewritten in place,
    so folder times alone would serve stale headers. The headers are the expensive part; they are what is saved."""

    files: List[str]
    stats: np.ndarray
    heads: _Headers
    taken_ns: int

    def save(self, path: Path, root: Path) -> None:
        """As one .npz (paths relative to the root, NUL-joined), written to a temp file and renamed."""
        cut = len(str(root) + os.sep)  # every listed file is under the root: store the rest of its path
        names = "\0".join(f[cut:] for f in self.files)
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
            with os.fdopen(fd, "wb") as f:
                np.savez(f, names=np.frombuffer(os.fsencode(names), np.uint8), stats=self.stats, wh=self.heads.wh,
                         mode=self.heads.mode, modes=np.asarray(json.dumps(self.heads.modes)),
                         taken_ns=np.int64(self.taken_ns))
            os.replace(tmp, path)
        except OSError as e:
            log.warning("could not cache the folder listing in %s (%s); the next scan reads every header", path, e)

    @classmethod
    def load(cls, path: Path, root: Path) -> Optional["_Listing"]:
        """The listing saved at `path`, or None where there is none or it cannot be read (every header is read)."""
        try:
            with np.load(path) as z:
                names = os.fsdecode(z["names"].tobytes())
                stats, wh, mode = z["stats"], z["wh"], z["mode"]
                modes, taken = json.loads(str(z["modes"])), int(z["taken_ns"])
        except (OSError, ValueError, KeyError):
            return None
        base = str(root) + os.sep
        files = [base + n for n in names.split("\0")] if names else []
        if not len(files) == len(stats) == len(wh) == len(mode) or (len(mode) and mode.max() >= len(modes)):
            return None
        return cls(files, stats, _Headers(wh, mode, modes), taken)


def _listing_headers(root: Path, files: List[str], stats: np.ndarray, started: int, old: Optional[_Listing],
                     workers: Optional[int], use_cache: bool) -> _Headers:
    """Every file's header: from the folder's cached listing where the file's stat is unchanged (and not racy), read
    in parallel otherwise; the new listing is cached when anything was read or the file list changed."""
    n = len(files)
    heads = _Headers(np.full((n, 2), -1, np.int64), np.full(n, -1, np.int64), [])
    reuse = np.zeros(n, bool)
    if old is not None:
        if old.files == files:
            j = np.arange(n)
        else:
            pos = dict(zip(old.files, range(len(old.files))))
            j = np.fromiter((pos.get(f, -1) for f in files), np.int64, n)
        known = np.nonzero(j >= 0)[0]
        same = (old.stats[j[known]] == stats[known]).all(axis=1) & \
            (stats[known, 1:].max(axis=1, initial=0) < old.taken_ns - RACY_NS)
        reuse[known[same]] = True
        heads.wh[reuse], heads.mode[reuse], heads.modes = old.heads.wh[j[reuse]], old.heads.mode[j[reuse]], \
            list(old.heads.modes)
        log.info("folder listing of %s: %d of %d headers from the cache", root, int(reuse.sum()), n)
    todo = np.nonzero(~reuse)[0]
    if len(todo):
        index = {m: i for i, m in enumerate(heads.modes)}
        for i, h in zip(todo, _map(_headers, [files[i] for i in todo], workers, pool=SCAN_POOL, chunk=2048)):
            if h is not None:
                heads.wh[i] = h[:2]
                heads.mode[i] = index.setdefault(h[2], len(index))
        heads.modes = list(index)
    if use_cache and (len(todo) or old is None or old.files != files):
        _Listing(files, stats, heads, started).save(_listing_path(root), root)
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


def _workers(n_items: int, workers: Optional[int]) -> int:
    """How many workers: `workers` if given, else every core once there are enough items to pay for them."""
    if workers is not None:
        return max(1, int(workers))
    return 1 if n_items < _PARALLEL_MIN else (os.cpu_count() or 1)


def _map(fn, items: Sequence, workers: Optional[int], pool: str = "process", chunk: Optional[int] = None) -> list:
    """`fn` over `items` in order. With `chunk`, `fn` takes a list and returns one result per item, and the items go
    to the workers in chunks of at most `chunk` (at least one per worker); else each item is one job. Runs here when
    one worker is wanted. `pool`: 'process' or 'thread'."""
    n = min(_workers(len(items) if chunk else _PARALLEL_MIN, workers), max(1, len(items)))
    if chunk:
        chunk = max(1, min(chunk, -(-len(items) // n)))
    jobs = [items[i:i + chunk] for i in range(0, len(items), chunk)] if chunk else list(items)
    if n <= 1:
        results = map(fn, jobs)
    else:
        ex = _pool(n) if pool == "process" else ThreadPoolExecutor(max_workers=n)
        with ex:
            results = list(ex.map(fn, jobs))
    if not chunk:
        return list(results)
    out: list = []
    for part in results:
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
