"""Past one machine (issue 16): how the data path scales. One script, one section per measurement; each section
prints its figures and its ratio last, and the script's last line is the last section's ratio.

    python benchmarks/scale.py --sections loader                # shards vs folder vs in-memory, 1 and 2 workers
    python benchmarks/scale.py --sections loader --images 8000  # a bigger generated folder
    python benchmarks/scale.py --quick                          # every section, tiny (a test)

Sections:
  loader  A generated folder of N small JPEGs (10 classes, --size px) read as training batches (default augmentation,
          batch --batch-size) by three paths, one epoch each, in turns, medians over --repeat rounds: WebDataset
          shards (`vitkit shards`, then `--data wds:`: workers decode, the batch augmentation runs in the main
          process), the folder streamed from disk (`ImageFolderDataset`: workers read and augment per image) and
          the folder decoded once into uint8 tensors (in memory: batches sliced and augmented here, no workers).
          Shards and the streamed folder at 1 and 2 DataLoader workers. No model: the loaders alone, in images/s.
"""
from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from pathlib import Path

from common import machine


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


SECTIONS = {"loader": (loader, _loader_args)}


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
    print(machine())
    return {name: SECTIONS[name][0](args) for name in names}


if __name__ == "__main__":
    main()
