"""Search at scale: vitkit.Index over N random unit vectors (default 1,000,000 x 384, the width of ViT-S).

For each index kind: build time (including IVF training), median single-query latency (k=10; queries
interleaved across the indexes, so they share the machine's state), and recall@10 of the approximate indexes
against the exact one. Random vectors are the hardest case for approximate search (no clusters to exploit), so
the recall here is a floor for real embeddings. The last line is the speed-up of the approximate index over exact
search, with its recall.

    python benchmarks/retrieval.py              # 1M x 384, flat + IVF (add --hnsw for HNSW: slow to build)
    python benchmarks/retrieval.py --quick      # 20k x 384, flat + IVF, a few seconds (run by a test)
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from vitkit.tasks.retrieve import Index  # noqa: E402


def random_unit(n: int, d: int, seed: int, chunk: int = 100_000) -> np.ndarray:
    rng = np.random.default_rng(seed)
    out = np.empty((n, d), np.float32)
    for i in range(0, n, chunk):
        x = rng.standard_normal((min(chunk, n - i), d), dtype=np.float32)
        out[i: i + len(x)] = x / np.linalg.norm(x, axis=1, keepdims=True)
    return out


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=1_000_000)
    ap.add_argument("--dim", type=int, default=384)
    ap.add_argument("--queries", type=int, default=200, help="single queries timed (and scored for recall)")
    ap.add_argument("--nlist", type=int, default=1024, help="IVF cells")
    ap.add_argument("--nprobe", type=int, nargs="+", default=[16, 64, 256], help="IVF cells searched (a sweep)")
    ap.add_argument("--hnsw", action="store_true", help="also build HNSW (M=32; minutes at 1M on 2 cores)")
    ap.add_argument("--ef-search", type=int, nargs="+", default=[64, 256])
    ap.add_argument("--threads", type=int, default=None, help="faiss threads (default: all cores)")
    ap.add_argument("--quick", action="store_true", help="20k vectors, 100 queries, flat and IVF")
    args = ap.parse_args(argv)
    if args.quick:
        args.n, args.queries, args.nlist = 20_000, 100, 128
        args.nprobe = [8, 32]
    import faiss

    threads = faiss.omp_get_max_threads()
    if args.threads:
        faiss.omp_set_num_threads(args.threads)
    try:
        return _run(args, faiss)
    finally:
        faiss.omp_set_num_threads(threads)  # a test calls main(): leave the process as it was


def _run(args, faiss) -> dict:
    t = time.perf_counter()
    xb = random_unit(args.n, args.dim, seed=0)
    xq = random_unit(args.queries, args.dim, seed=1)
    print(f"data: {args.n} x {args.dim} float32 ({xb.nbytes / 2**30:.2f} GiB) in {time.perf_counter() - t:.1f}s, "
          f"faiss {faiss.__version__}, {faiss.omp_get_max_threads()} threads", file=sys.stderr)

    indexes, build_s = {}, {}
    plans = [("flat", {}), ("ivf", {"nlist": args.nlist, "nprobe": args.nprobe[0]})]
    if args.hnsw:
        plans.append(("hnsw", {"M": 32, "ef_search": args.ef_search[0], "ef_construction": 80}))
    for kind, params in plans:
        t = time.perf_counter()
        index = Index(args.dim, kind, **params)
        for i in range(0, args.n, 250_000):  # add in slices: no second full-size copy of the data
            index.add(xb[i: i + 250_000])
        build_s[kind] = time.perf_counter() - t
        indexes[kind] = index
        print(f"built {kind} in {build_s[kind]:.1f}s", file=sys.stderr)

    # the settings to compare: exact, then each IVF nprobe and HNSW efSearch
    settings = [("flat", None)] + [("ivf", p) for p in args.nprobe]
    if args.hnsw:
        settings += [("hnsw", e) for e in args.ef_search]

    def configure(kind, value):
        if kind == "ivf":
            indexes[kind].set_search_params(nprobe=value)
        elif kind == "hnsw":
            indexes[kind].set_search_params(ef_search=value)

    lat = {s: [] for s in settings}
    ids = {s: [] for s in settings}
    for _ in range(1):  # warm-up
        for s in settings:
            configure(*s)
            indexes[s[0]].search(xq[:1], 10)
    for qi in range(args.queries):
        for s in settings:
            configure(*s)
            t = time.perf_counter()
            _, i = indexes[s[0]].search(xq[qi: qi + 1], 10)
            lat[s].append(time.perf_counter() - t)
            ids[s].append(i[0])
    exact = ids[("flat", None)]
    rows = []
    for s in settings:
        recall = float(np.mean([len(set(a) & set(b)) / 10 for a, b in zip(ids[s], exact)]))
        row = {"kind": s[0], "param": ({"ivf": "nprobe", "hnsw": "ef_search"}.get(s[0])), "value": s[1],
               "build_s": round(build_s[s[0]], 2), "median_ms": round(1e3 * statistics.median(lat[s]), 3),
               "recall@10": round(recall, 4)}
        rows.append(row)
        print(json.dumps(row))
    flat_ms = rows[0]["median_ms"]
    # the headline: the fastest IVF setting with recall@10 >= 0.9, else the one with the best recall
    ivf = [r for r in rows if r["kind"] == "ivf"]
    good = [r for r in ivf if r["recall@10"] >= 0.9]
    best = min(good, key=lambda r: r["median_ms"]) if good else max(ivf, key=lambda r: r["recall@10"])
    result = {"n": args.n, "dim": args.dim, "rows": rows, "speedup": flat_ms / best["median_ms"],
              "recall@10": best["recall@10"]}
    print(f"IVF (nlist {args.nlist}, nprobe {best['value']}) vs exact on {args.n:,} x {args.dim}: "
          f"{result['speedup']:.1f}x faster per query ({best['median_ms']:.2f} vs {flat_ms:.2f} ms), "
          f"recall@10 {best['recall@10']:.3f}")
    return result


if __name__ == "__main__":
    main()
