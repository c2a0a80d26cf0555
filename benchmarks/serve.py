"""`vitkit serve` under load, on loopback: vitkit's dynamic batching against a plain FastAPI endpoint that runs the
model once per request, in the same run, on the same model, the same preprocessing and the same fast path.

For each model (the demo digits model and ViT-S/16, random weights: speed does not depend on them) both servers
start as their own processes; then for 1, 8, 32 and 128 concurrent clients each server in turn (interleaved) gets
a fixed time of closed-loop POST /v1/classify requests with one PNG. Reported per point: requests/s, p50/p95/p99
latency, mean images per forward (vitkit: from its /metrics; the plain endpoint: 1), the server's CPU time per
answered request (on a shared machine, wall-clock throughput follows how many runnable threads each process has;
CPU per request does not), errors (non-200 answers: must be 0 below --max-queue), and the server's resident memory at start, at the end and at its peak (VmHWM: it
must stay flat over the run). The last line: vitkit over plain at 32 clients on ViT-S/16: throughput, p99, and
requests per CPU-second.

    python benchmarks/serve.py                  # both models, 10 s per point
    python benchmarks/serve.py --seconds 3      # shorter
    python benchmarks/serve.py --quick          # the demo model only, 1 and 8 clients, 1 s (run by a test)
"""
from __future__ import annotations

import argparse
import asyncio
import io
import json
import os
import re
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

MODELS = {"demo": ("vit_mini_patch7_28", {}), "vit_s16": ("vit_small_patch16_224", {})}


# ---- the baseline: one request, one forward ------------------------------------------------------------------
def plain_app(checkpoint: str, fast: bool):
    """The FastAPI endpoint one writes first: read the upload, preprocess, run the model on it alone. It loads and
    preprocesses as vitkit does (same model, same fast path): the only difference measured is the batching."""
    import torch
    from fastapi import FastAPI

    from vitkit.data import eval_transform, read_image
    from vitkit.models import Preprocessing
    from vitkit.models.fast import optimize
    from vitkit.tasks.classify import classify_logits, load_classifier

    model, names = load_classifier(checkpoint)
    fast_model = optimize(model) if fast else model
    tf = eval_transform(Preprocessing.of(model))
    app = FastAPI()

    @app.post("/v1/classify")
    def classify(body: bytes = _body()):  # a plain `def`: FastAPI runs it on its thread pool
        x = tf(read_image(io.BytesIO(body), model.config.in_chans))[None]
        with torch.inference_mode():
            p = classify_logits(fast_model, x).softmax(-1)[0]
        top, idx = p.topk(5)
        return {"label": names[int(idx[0])], "topk": [{"label": names[i], "prob": q}
                                                      for i, q in zip(idx.tolist(), top.tolist())]}

    @app.get("/readyz")
    def ready():
        return {"status": "ready"}

    return app


def _body():
    from fastapi import Body

    return Body(..., media_type="image/png")


# ---- servers and clients ---------------------------------------------------------------------------------------
def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start(kind: str, checkpoint: str, fast: bool, max_queue: int):
    port = _port()
    env = dict(os.environ, PYTHONPATH=str(ROOT / "src"), OMP_WAIT_POLICY="PASSIVE")
    if kind == "vitkit":
        cmd = [sys.executable, "-m", "vitkit", "serve", checkpoint, "--port", str(port), "--quiet",
               "--max-queue", str(max_queue)] + ([] if fast else ["--no-fast"])
    else:
        cmd = [sys.executable, __file__, "--plain-server", checkpoint, "--port", str(port)] + \
              ([] if fast else ["--no-fast"])
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    url = f"http://127.0.0.1:{port}"
    t0 = time.time()
    while True:
        try:
            with urllib.request.urlopen(url + "/readyz", timeout=2) as r:
                if r.status == 200:
                    return proc, url
        except OSError:
            pass
        if proc.poll() is not None or time.time() - t0 > 600:
            proc.kill()
            raise RuntimeError(f"{kind} server did not start: {proc.stderr.read()[-2000:]}")
        time.sleep(0.2)


def rss(pid: int) -> dict:
    """The process's resident memory now and at its peak (MB), from /proc."""
    out = {}
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(("VmRSS", "VmHWM")):
                out[line.split(":")[0]] = int(line.split()[1]) / 1024
    except OSError:
        pass
    return out


def cpu_seconds(pid: int) -> float:
    """CPU time the process has used (user + system, all its threads): on a shared machine, where wall-clock
    throughput follows how many threads each process runs, the fair measure of what a request costs."""
    try:
        f = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(f[11]) + int(f[12])) / os.sysconf("SC_CLK_TCK")
    except (OSError, IndexError, ValueError):
        return float("nan")


def batches(url: str) -> tuple:
    """(forwards, images) of classify so far, from vitkit's /metrics."""
    try:
        text = urllib.request.urlopen(url + "/metrics", timeout=5).read().decode()
    except OSError:
        return 0.0, 0.0
    get = lambda k: float(next(iter(re.findall(rf'^vitkit_batch_size_{k}{{task="classify"}} (\S+)$', text, re.M)),
                               0.0))
    return get("count"), get("sum")


async def load(url: str, image: bytes, clients: int, seconds: float) -> dict:
    """`clients` closed loops of POST /v1/classify for `seconds`: latencies of the answers, errors."""
    import httpx

    lat, errors = [], 0
    limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)
    async with httpx.AsyncClient(base_url=url, limits=limits, timeout=120) as client:
        stop = time.perf_counter() + seconds

        async def loop():
            nonlocal errors
            while time.perf_counter() < stop:
                t0 = time.perf_counter()
                try:
                    r = await client.post("/v1/classify", content=image, headers={"content-type": "image/png"})
                    ok = r.status_code == 200
                except httpx.HTTPError:
                    ok = False
                if ok:
                    lat.append(time.perf_counter() - t0)
                else:
                    errors += 1

        t0 = time.perf_counter()
        await asyncio.gather(*(loop() for _ in range(clients)))
        wall = time.perf_counter() - t0
    q = statistics.quantiles(lat, n=100, method="inclusive") if len(lat) > 1 else [lat[0] if lat else 0.0] * 99
    return {"requests": len(lat), "req_s": len(lat) / wall, "p50_ms": 1e3 * q[49], "p95_ms": 1e3 * q[94],
            "p99_ms": 1e3 * q[98], "errors": errors}


def measure(kind: str, url: str, pid: int, image: bytes, clients: int, seconds: float) -> dict:
    before = batches(url) if kind == "vitkit" else None
    cpu0 = cpu_seconds(pid)
    row = asyncio.run(load(url, image, clients, seconds))
    row["cpu_ms_per_req"] = 1e3 * (cpu_seconds(pid) - cpu0) / max(row["requests"], 1)
    if kind == "vitkit":
        n, s = (a - b for a, b in zip(batches(url), before))
        row["mean_batch"] = s / n if n else float("nan")
    else:
        row["mean_batch"] = 1.0
    mem = rss(pid)
    row["rss_mb"], row["peak_mb"] = mem.get("VmRSS", float("nan")), mem.get("VmHWM", float("nan"))
    return row


def checkpoint(name: str, folder: Path) -> tuple:
    """A random-weight classifier of the named config, saved as a vitkit checkpoint, and a PNG it takes."""
    import numpy as np
    import torch
    from PIL import Image

    import vitkit

    torch.manual_seed(0)
    model = vitkit.create_model(name)
    path = folder / f"{name}.safetensors"
    vitkit.save(model, path, class_names=[f"class{i}" for i in range(model.num_classes)])
    c = model.config
    size = c.img_size if isinstance(c.img_size, int) else c.img_size[0]
    rng = np.random.default_rng(0)
    arr = rng.integers(0, 256, (size, size) if c.in_chans == 1 else (size, size, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, "PNG")
    return str(path), buf.getvalue()


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", nargs="+", choices=list(MODELS), default=list(MODELS))
    ap.add_argument("--clients", type=int, nargs="+", default=[1, 8, 32, 128])
    ap.add_argument("--seconds", type=float, default=10.0, help="load time per point")
    ap.add_argument("--max-queue", type=int, default=256)
    ap.add_argument("--no-fast", action="store_true", help="both servers on the plain PyTorch model")
    ap.add_argument("--quick", action="store_true", help="the demo model, 1 and 8 clients, 1 s per point")
    ap.add_argument("--json", default=None, help="also write the results here")
    ap.add_argument("--plain-server", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--port", type=int, default=8001, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.plain_server:  # a child: serve the baseline until killed
        import uvicorn

        uvicorn.run(plain_app(args.plain_server, not args.no_fast), host="127.0.0.1", port=args.port,
                    log_level="warning")
        return {}
    if args.quick:
        args.models, args.clients = ["demo"], [1, 8]
        args.seconds = args.seconds if "--seconds" in (argv or sys.argv) else 1.0
    from common import machine  # noqa: E402 (benchmarks/common.py)

    print(f"# {machine()}")
    print(f"# {args.seconds:g} s per point, loopback, closed-loop clients, fast path "
          f"{'off' if args.no_fast else 'on'}, vitkit --max-queue {args.max_queue} (--max-batch-size 32, "
          f"--max-wait-ms 5)")
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for model in args.models:
            ckpt, image = checkpoint(MODELS[model][0], Path(tmp))
            servers = {k: start(k, ckpt, not args.no_fast, args.max_queue) for k in ("vitkit", "plain")}
            try:
                start_rss = {k: rss(p.pid).get("VmRSS", float("nan")) for k, (p, _) in servers.items()}
                for k, (p, url) in servers.items():  # warm both (first requests, thread pools, allocator)
                    asyncio.run(load(url, image, 4, min(1.0, args.seconds)))
                for clients in args.clients:
                    for k in ("vitkit", "plain"):  # interleaved: drifts of a shared machine hit both
                        p, url = servers[k]
                        row = {"model": MODELS[model][0], "server": k, "clients": clients,
                               **measure(k, url, p.pid, image, clients, args.seconds), "start_rss_mb": start_rss[k]}
                        rows.append(row)
                        print(f"{row['model']:<22} {k:<7} {clients:>4} clients: {row['req_s']:8.1f} req/s  p50 "
                              f"{row['p50_ms']:8.1f}  p95 {row['p95_ms']:8.1f}  p99 {row['p99_ms']:8.1f} ms  batch "
                              f"{row['mean_batch']:5.1f}  CPU {row['cpu_ms_per_req']:6.1f} ms/req  errors {row['errors']}  RSS {row['start_rss_mb']:.0f} → "
                              f"{row['rss_mb']:.0f} MB (peak {row['peak_mb']:.0f})", flush=True)
            finally:
                for p, _ in servers.values():
                    p.terminate()
                    p.wait(15)
    pick = {(r["model"], r["server"]): r for r in rows if r["clients"] == (32 if 32 in args.clients else
                                                                            max(args.clients))}
    name = MODELS["vit_s16" if "vit_s16" in args.models else args.models[0]][0]
    a, b = pick[(name, "vitkit")], pick[(name, "plain")]
    ratio = {"model": name, "clients": a["clients"], "throughput": a["req_s"] / max(b["req_s"], 1e-9),
             "p99": a["p99_ms"] / max(b["p99_ms"], 1e-9),
             "cpu_per_req": b["cpu_ms_per_req"] / max(a["cpu_ms_per_req"], 1e-9)}
    out = {"rows": rows, "ratio": ratio}
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=2))
    print(f"ratio vitkit/plain at {ratio['clients']} clients on {name}: throughput {ratio['throughput']:.2f}x, "
          f"p99 latency {ratio['p99']:.2f}x (below 1: vitkit answers faster), requests per CPU-second "
          f"{ratio['cpu_per_req']:.2f}x")
    return out


if __name__ == "__main__":
    main()
