"""Past one machine (issue 16): how the data path scales. One script, one section per measurement; each section
prints its figures and its ratio last, and the script's last line is the last section's ratio.

    python benchmarks/scale.py --sections scan                  # scan a generated folder of 1,000,000 tiny files
    python benchmarks/scale.py --sections scan --files 200000   # fewer files
    python benchmarks/scale.py --sections loader                # shards vs folder vs in-memory, 1 and 2 workers
    python benchmarks/scale.py --sections loader --images 8000  # a bigger generated folder
    python benchmarks/scale.py --quick                          # every section, tiny (a test)

Sections:
  scan  A folder of N tiny PNG/JPEG files (generated in a temp dir) scanned by the old serial scan (one process:
        list, then read every header), by vitkit's scan with no listing cache (class folders listed and headers
        read in worker processes; also with threads, to show which pool wins), and again with the listing cached
        (every file stat'ed, no header read). One process, the candidates in turns, medians over --repeat rounds.
  loader  A generated folder of N small JPEGs (10 classes, --size px) read as training batches (default augmentation,
          batch --batch-size) by three paths, one epoch each, in turns, medians over --repeat rounds: WebDataset
          shards (`vitkit shards`, then `--data wds:`: workers decode, the batch augmentation runs in the main
          process), the folder streamed from disk (`ImageFolderDataset`: workers read and augment per image) and
          the folder decoded once into uint8 tensors (in memory: batches sliced and augmented here, no workers).
          Shards and the streamed folder at 1 and 2 DataLoader workers. No model: the loaders alone, in images/s.
"""
from __future__ import annotations

import argparse
import io
import os
import statistics
import tempfile
import time
from pathlib import Path

from common import machine


# ---- scan --------------------------------------------------------------------------------------------------------
def _scan_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("scan")
    g.add_argument("--files", type=int, default=1_000_000, help="scan: files in the generated folder")
    g.add_argument("--classes", type=int, default=100, help="scan: class folders they are spread over")
    g.add_argument("--repeat", type=int, default=1, help="scan: rounds of the candidates (medians)")
    g.add_argument("--dir", default=None, help="scan: where to generate the folder (default: a temp dir)")


def _tiny_images():
    """A few tiny encoded images (PNG and JPEG, grey and colour, several sizes): what the files hold."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    out = []
    for i, (w, h) in enumerate(((8, 8), (12, 10), (16, 16), (9, 14))):
        arr = rng.integers(0, 255, (h, w, 3) if i % 2 == 0 else (h, w), dtype=np.uint8)
        for fmt, ext in (("PNG", ".png"), ("JPEG", ".jpg")):
            b = io.BytesIO()
            Image.fromarray(arr).save(b, fmt)
            out.append((ext, b.getvalue()))
    return out


def make_folder(root: Path, files: int, classes: int) -> float:
    """root/c000/000000.png ... : `files` tiny images over `classes` folders. Returns the seconds it took."""
    t = time.perf_counter()
    images = _tiny_images()
    per = -(-files // classes)
    done = 0
    for c in range(classes):
        d = root / f"c{c:03d}"
        d.mkdir(parents=True, exist_ok=True)
        for i in range(min(per, files - done)):
            ext, data = images[(c + i) % len(images)]
            fd = os.open(d / f"{i:07d}{ext}", os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
            os.write(fd, data)
            os.close(fd)
        done += min(per, files - done)
    return time.perf_counter() - t


def old_serial_scan(root: Path):
    """The scan as it was before issue 16: each class folder listed by `image_files`, every file stat'ed for the
    header cache's key, every header read in this process (the cache itself left out: this is its first scan)."""
    from vitkit.data.folders import _headers, _list_classes
    from vitkit.data.images import image_files

    files = [str(f) for c in _list_classes(root) for f in image_files(root / c)]
    for f in files:
        os.stat(f)
    return files, _headers(files)


def scan(args) -> dict:
    import vitkit.data.folders as folders

    tmp = tempfile.TemporaryDirectory(dir=args.dir)
    root = Path(tmp.name) / "folder"
    os.environ["VITKIT_CACHE"] = str(Path(tmp.name) / "cache")  # never the user's cache
    gen = make_folder(root, args.files, args.classes)
    print(f"scan: generated {args.files:,} files in {args.classes} folders in {gen:.1f} s ({root})", flush=True)
    listing = folders._listing_path(root)

    def old():
        files, heads = old_serial_scan(root)
        return len(files)

    def first(pool="process"):
        listing.unlink(missing_ok=True)
        folders.SCAN_POOL = pool
        try:
            return len(folders.scan_folder(root))
        finally:
            folders.SCAN_POOL = "process"

    def cached():
        assert listing.is_file()
        return len(folders.scan_folder(root))

    cands = [("old serial scan", old), ("first scan, threads", lambda: first("thread")),
             ("first scan, processes", first), ("cached rescan", cached)]
    times = {name: [] for name, _ in cands}
    for r in range(args.repeat):
        for name, fn in cands:
            t = time.perf_counter()
            n = fn()
            times[name].append(time.perf_counter() - t)
            print(f"  round {r + 1}: {name:<22} {times[name][-1]:8.2f} s ({n:,} files)", flush=True)
    med = {k: statistics.median(v) for k, v in times.items()}
    for k, v in med.items():
        print(f"{k:>24}: {v:8.2f} s  {args.files / v:>10,.0f} files/s  (median of {args.repeat})")
    ratio = med["old serial scan"] / med["first scan, processes"]
    print(f"ratio old serial scan / first scan: {ratio:.2f}; / cached rescan: "
          f"{med['old serial scan'] / med['cached rescan']:.2f} ({args.files:,} files, {os.cpu_count()} cores)",
          flush=True)
    tmp.cleanup()  # after the figures: a million files take a while to delete
    return {"files": args.files, "generate_s": gen, "seconds": med, "ratio": ratio,
            "ratio_cached": med["old serial scan"] / med["cached rescan"]}




# ---- loader ------------------------------------------------------------------------------------------------------
def _loader_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("loader")
    g.add_argument("--images", type=int, default=4000, help="loader: images in the generated folder")
    g.add_argument("--size", type=int, default=32, help="loader: their side in pixels (and the model's input)")
    g.add_argument("--batch-size", type=int, default=128, help="loader: images per batch")
    g.add_argument("--loader-repeat", type=int, default=3, help="loader: rounds of the candidates (medians)")


def make_jpeg_folder(root: Path, images: int, size: int, classes: int = 10) -> float:
    """root/c0/00000.jpg ...: `images` random-texture JPEGs of size x size over `classes` folders; seconds taken."""
    import numpy as np
    from PIL import Image

    t = time.perf_counter()
    rng = np.random.default_rng(0)
    base = rng.integers(0, 255, (classes, size // 4, size // 4, 3), dtype=np.uint8)
    for i in range(images):
        c = i % classes
        (root / f"c{c}").mkdir(parents=True, exist_ok=True)
        noise = rng.integers(-40, 40, (size, size, 3))
        img = np.kron(base[c], np.ones((4, 4, 1), np.uint8)).astype(np.int64) + noise
        Image.fromarray(img.clip(0, 255).astype(np.uint8)).save(root / f"c{c}" / f"{i:05d}.jpg", quality=90)
    return time.perf_counter() - t


def loader(args) -> dict:
    """Training-batch throughput of shards, the streamed folder and in-memory tensors (see the module docstring)."""
    from vitkit.data import build_datasets, make_loader
    from vitkit.data.shards import write_shards

    n, size, bs, repeat = args.images, args.size, args.batch_size, args.loader_repeat
    if args.quick:
        n, size, bs, repeat = 96, 16, 16, 1
    tmp = tempfile.TemporaryDirectory()
    root = Path(tmp.name)
    os.environ["VITKIT_CACHE"] = str(root / "cache")  # never the user's cache
    gen = make_jpeg_folder(root / "imgs", n, size)
    t = time.perf_counter()
    info = write_shards(f"folder:{root / 'imgs'}", root / "wds", max_count=max(1, n // 16), progress=False)
    print(f"loader: {n:,} JPEGs of {size}x{size} generated in {gen:.1f} s, written as "
          f"{len(info['splits']['train']['filenames'])} training shards in {time.perf_counter() - t:.1f} s", flush=True)
    common = dict(img_size=size, augment="default", progress=False)
    shards, _, _ = build_datasets(f"wds:{root / 'wds'}", **common)
    streamed, _, _ = build_datasets(f"folder:{root / 'imgs'}", stream=True, **common)
    memory, _, _ = build_datasets(f"folder:{root / 'imgs'}", stream=False, **common)

    def epoch(ds, workers):
        count = 0
        for x, _ in make_loader(ds, bs, train=True, seed=0, epoch=0, workers=workers):
            count += len(x)
        return count

    cands = [(f"shards, {w} worker{'s' if w > 1 else ''}", shards, w) for w in (1, 2)]
    cands += [(f"folder streamed, {w} worker{'s' if w > 1 else ''}", streamed, w) for w in (1, 2)]
    cands += [("in-memory tensors", memory, 0)]
    rates = {name: [] for name, _, _ in cands}
    for r in range(repeat):
        for name, ds, w in cands:
            t = time.perf_counter()
            k = epoch(ds, w)
            rates[name].append(k / (time.perf_counter() - t))
            print(f"  round {r + 1}: {name:<26} {rates[name][-1]:10,.0f} img/s ({k:,} images)", flush=True)
    med = {k: statistics.median(v) for k, v in rates.items()}
    for k, v in med.items():
        print(f"{k:>28}: {v:10,.0f} img/s  (median of {repeat})")
    tmp.cleanup()
    ratio = med["shards, 2 workers"] / med["folder streamed, 2 workers"]
    print(f"ratio shards / folder streamed img/s at 2 workers: {ratio:.2f}; shards / in-memory: "
          f"{med['shards, 2 workers'] / med['in-memory tensors']:.2f} ({n:,} images of {size} px, batch {bs}, "
          f"{os.cpu_count()} cores)")
    return {"images": n, "size": size, "img_per_s": med, "ratio": ratio,
            "ratio_memory": med["shards, 2 workers"] / med["in-memory tensors"]}


SECTIONS = {"scan": (scan, _scan_args), "loader": (loader, _loader_args)}


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--sections", default=",".join(SECTIONS), help=f"comma-separated: {', '.join(SECTIONS)}")
    p.add_argument("--quick", action="store_true", help="tiny settings (a smoke test)")
    for _, add in SECTIONS.values():
        add(p)
    args = p.parse_args(argv)
    names = [s.strip() for s in args.sections.split(",") if s.strip()]
    unknown = [s for s in names if s not in SECTIONS]
    if unknown:
        p.error(f"unknown section(s) {', '.join(unknown)}; known: {', '.join(SECTIONS)}")
    if args.quick:
        args.files, args.classes, args.repeat = 600, 4, 1
    print(machine())
    return {name: SECTIONS[name][0](args) for name in names}


if __name__ == "__main__":
    main()
