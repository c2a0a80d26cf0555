"""`vitkit serve` under load, on loopback: vitkit's dynamic batching against a plain FastAPI endpoint that runs the
model once per request, in the same run, on the same model and the same preprocessing.

Two baselines, because `vitkit serve` runs the fast path at precision auto (it may pick bf16 or int8) while
`vitkit.optimize(model)` gives a user fp32:
- "plain": the endpoint one writes first, on `optimize(model)` (fp32 fast path): what vitkit is worth to a user;
- "plain-same": the same endpoint at the precision vitkit picked (read from its /v1/model): batching alone.
(plain-same is left out when vitkit picked fp32, or with --no-fast: it would be plain.)

For each model (the demo digits model and ViT-S/16, random weights: speed does not depend on them) the servers
start as their own processes; then for 1, 8, 32 and 128 concurrent clients each server in turn (interleaved) gets
a fixed time of closed-loop POST /v1/classify requests with one PNG. Reported per point: requests/s, p50/p95/p99
latency, mean images per forward (vitkit: from its /metrics; the plain endpoints: 1), the server's CPU time per
answered request (on a shared machine, wall-clock throughput follows how many runnable threads each process has;
CPU per request does not), errors (non-200 answers: must be 0 below --max-queue), and the server's resident memory
sampled every 0.5 s: after the first second of load, at its end, and the peak (VmHWM): it must stay flat. The last
line: vitkit over plain at 32 clients on ViT-S/16 (throughput, p99), and batching alone (over plain-same).
`--long N` instead holds one point (vitkit alone, ViT-S/16 at 32 clients) for N seconds and says whether resident
memory stayed within a stated bound after the first seconds.

    python benchmarks/serve.py                  # both models, 10 s per point
    python benchmarks/serve.py --seconds 3      # shorter
    python benchmarks/serve.py --long 300       # RSS over 5 minutes at one point
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
import threading
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

MODELS = {"demo": ("vit_mini_patch7_28", {}), "vit_s16": ("vit_small_patch16_224", {})}


# ---- the baseline: one request, one forward ------------------------------------------------------------------
def plain_app(checkpoint: str, fast: bool, precision: str = "fp32"):
    """The FastAPI endpoint one writes first: read the upload, preprocess, run the model on it alone. It loads and
    preprocesses as vitkit does; `optimize(model)` (fp32, what a user gets) or, for plain-same, at `precision`."""
    import torch
    from fastapi import FastAPI

    from vitkit.data import eval_transform, read_image
    from vitkit.models import Preprocessing
    from vitkit.models.fast import optimize
    from vitkit.tasks.classify import classify_logits, load_classifier

    model, names = load_classifier(checkpoint)
    fast_model = (optimize(model) if precision == "fp32" else optimize(model, precision=precision)) if fast else model
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


def start(kind: str, checkpoint: str, fast: bool, max_queue: int, precision: str = "fp32"):
    """A server as its own process, once /readyz answers: vitkit serve (at `precision`: auto by default), or the
    plain endpoint at `precision`."""
    port = _port()
    env = dict(os.environ, PYTHONPATH=str(ROOT / "src"), OMP_WAIT_POLICY="PASSIVE")
    if kind == "vitkit":
        cmd = [sys.executable, "-m", "vitkit", "serve", checkpoint, "--port", str(port), "--quiet",
               "--max-queue", str(max_queue), "--precision", precision] + ([] if fast else ["--no-fast"])
    else:
        cmd = [sys.executable, __file__, "--plain-server", checkpoint, "--port", str(port),
               "--plain-precision", precision] + ([] if fast else ["--no-fast"])
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


class RssSampler:
    """The process's resident memory every `every` seconds, in a thread, while a load runs."""

    def __init__(self, pid: int, every: float = 0.5):
        self.pid, self.every, self.samples = pid, every, []  # (seconds since start, RSS MB, peak MB)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        t0 = time.perf_counter()
        while True:
            mem = rss(self.pid)
            if "VmRSS" in mem:
                self.samples.append((time.perf_counter() - t0, mem["VmRSS"], mem.get("VmHWM", float("nan"))))
            if self._stop.wait(self.every):
                return

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()

    def after(self, settle: float, peak: bool = False) -> list:
        """RSS (or the peak so far) from `settle` seconds on (the first seconds of a load allocate its buffers), MB."""
        late = [m[2 if peak else 1] for m in self.samples if m[0] >= settle]
        return late or [m[2 if peak else 1] for m in self.samples[-1:]]


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
    with RssSampler(pid) as mem:
        row = asyncio.run(load(url, image, clients, seconds))
    row["cpu_ms_per_req"] = 1e3 * (cpu_seconds(pid) - cpu0) / max(row["requests"], 1)
    if kind == "vitkit":
        n, s = (a - b for a, b in zip(batches(url), before))
        row["mean_batch"] = s / n if n else float("nan")
    else:
        row["mean_batch"] = 1.0
    late = mem.after(min(1.0, seconds / 2))
    row["rss_start_mb"], row["rss_end_mb"], row["rss_max_mb"] = late[0], late[-1], max(late)
    row["growth_mb"] = late[-1] - late[0]
    row["rss_mb"], row["peak_mb"] = late[-1], rss(pid).get("VmHWM", float("nan"))
    return row


def long_run(url: str, pid: int, image: bytes, clients: int, seconds: float, settle: float) -> dict:
    """One point held for `seconds`, RSS every 0.5 s. RSS swings by a batch's activations within each forward, so
    flat means: after the first `settle` seconds, neither the highest RSS of the second half of the run nor the
    peak (VmHWM) at its end exceeds those of the first half (or the peak at `settle`) by more than max(50 MB, 5 %)."""
    with RssSampler(pid) as mem:
        row = asyncio.run(load(url, image, clients, seconds))
    late, peaks = mem.after(settle), mem.after(settle, peak=True)
    half = len(late) // 2
    first, second = max(late[:half] or late), max(late[half:])
    bound = max(50.0, 0.05 * first)
    row.update(rss_start_mb=late[0], rss_end_mb=late[-1], rss_min_mb=min(late), rss_first_half_max_mb=first,
               rss_second_half_max_mb=second, peak_start_mb=peaks[0], peak_mb=peaks[-1], bound_mb=bound,
               samples=len(mem.samples), flat=second - first <= bound and peaks[-1] - peaks[0] <= bound)
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


def picked_precision(url: str) -> dict:
    """The precision vitkit serve runs at (auto picks it at start-up) and what it measured, from /v1/model."""
    card = json.loads(urllib.request.urlopen(url + "/v1/model", timeout=30).read())
    return {"precision": card.get("precision", "fp32"), "choice": card.get("precision_choice")}


def _row_line(row: dict) -> str:
    return (f"{row['model']:<22} {row['server']:<10} {row['clients']:>4} clients: {row['req_s']:8.1f} req/s  p50 "
            f"{row['p50_ms']:8.1f}  p95 {row['p95_ms']:8.1f}  p99 {row['p99_ms']:8.1f} ms  batch "
            f"{row['mean_batch']:5.1f}  CPU {row['cpu_ms_per_req']:6.1f} ms/req  errors {row['errors']}  RSS "
            f"{row['rss_start_mb']:.0f} → {row['rss_end_mb']:.0f} MB ({row['growth_mb']:+.0f} after the first "
            f"second; peak {row['peak_mb']:.0f})")


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", nargs="+", choices=list(MODELS), default=list(MODELS))
    ap.add_argument("--clients", type=int, nargs="+", default=[1, 8, 32, 128])
    ap.add_argument("--seconds", type=float, default=10.0, help="load time per point")
    ap.add_argument("--max-queue", type=int, default=256)
    ap.add_argument("--no-fast", action="store_true", help="every server on the plain PyTorch model")
    ap.add_argument("--precision", choices=["auto", "fp32", "bf16", "int8"], default="auto",
                    help="vitkit serve's --precision (plain-same follows what it runs at)")
    ap.add_argument("--long", type=float, default=None, metavar="N",
                    help="hold one point (vitkit, the last of --models, 32 clients or the first of --clients) for N s "
                    "and say whether resident memory stayed flat")
    ap.add_argument("--quick", action="store_true", help="the demo model, 1 and 8 clients, 1 s per point")
    ap.add_argument("--json", default=None, help="also write the results here")
    ap.add_argument("--plain-server", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--plain-precision", default="fp32", help=argparse.SUPPRESS)
    ap.add_argument("--port", type=int, default=8001, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.plain_server:  # a child: serve the baseline until killed
        import uvicorn

        uvicorn.run(plain_app(args.plain_server, not args.no_fast, args.plain_precision), host="127.0.0.1",
                    port=args.port, log_level="warning")
        return {}
    if args.quick:
        args.models, args.clients = ["demo"], [1, 8]
        args.seconds = args.seconds if "--seconds" in (argv or sys.argv) else 1.0
    from common import machine  # noqa: E402 (benchmarks/common.py)

    print(f"# {machine()}")
    if args.long:
        return _long(args)
    print(f"# {args.seconds:g} s per point, loopback, closed-loop clients, fast path "
          f"{'off' if args.no_fast else 'on'}, vitkit --max-queue {args.max_queue} (--max-batch-size 32, "
          f"--max-wait-ms 5); RSS sampled every 0.5 s")
    rows, picked = [], {}
    with tempfile.TemporaryDirectory() as tmp:
        for model in args.models:
            name = MODELS[model][0]
            ckpt, image = checkpoint(name, Path(tmp))
            servers = {"vitkit": start("vitkit", ckpt, not args.no_fast, args.max_queue, args.precision)}
            try:
                picked[name] = picked_precision(servers["vitkit"][1])
                prec = picked[name]["precision"]
                servers["plain"] = start("plain", ckpt, not args.no_fast, args.max_queue)
                same = not args.no_fast and prec != "fp32"
                if same:
                    servers["plain-same"] = start("plain", ckpt, True, args.max_queue, precision=prec)
                print(f"# {name}: vitkit serve runs at precision {prec}"
                      + (" (auto: measured at --max-batch-size when it started)" if picked[name]["choice"] else "")
                      + "; plain: optimize(model), fp32" + (f"; plain-same: optimize(model, precision={prec!r})"
                                                             if same else " (plain-same would be plain: left out)"),
                      flush=True)
                for k, (p, url) in servers.items():  # warm every server (first requests, thread pools, allocator)
                    asyncio.run(load(url, image, 4, min(1.0, args.seconds)))
                for clients in args.clients:
                    for k, (p, url) in servers.items():  # interleaved: drifts of a shared machine hit all of them
                        row = {"model": name, "server": k, "clients": clients,
                               **measure(k, url, p.pid, image, clients, args.seconds)}
                        rows.append(row)
                        print(_row_line(row), flush=True)
            finally:
                for p, _ in servers.values():
                    p.terminate()
                    p.wait(15)
    at = 32 if 32 in args.clients else max(args.clients)
    pick = {(r["model"], r["server"]): r for r in rows if r["clients"] == at}
    name = MODELS["vit_s16" if "vit_s16" in args.models else args.models[0]][0]
    a, b = pick[(name, "vitkit")], pick[(name, "plain")]
    c = pick.get((name, "plain-same"), b)
    ratio = {"model": name, "clients": at, "precision": picked[name]["precision"],
             "throughput": a["req_s"] / max(b["req_s"], 1e-9), "p99": a["p99_ms"] / max(b["p99_ms"], 1e-9),
             "cpu_per_req": b["cpu_ms_per_req"] / max(a["cpu_ms_per_req"], 1e-9),
             "batching_throughput": a["req_s"] / max(c["req_s"], 1e-9),
             "batching_p99": a["p99_ms"] / max(c["p99_ms"], 1e-9)}
    out = {"rows": rows, "ratio": ratio, "precision": picked}
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=2))
    print(f"ratio vitkit/plain at {at} clients on {name} (vitkit at {ratio['precision']}; plain: the fp32 fast path "
          f"optimize(model) gives): throughput {ratio['throughput']:.2f}x, p99 latency {ratio['p99']:.2f}x (below 1: "
          f"vitkit answers faster), requests per CPU-second {ratio['cpu_per_req']:.2f}x; batching alone (vs "
          f"plain-same at {ratio['precision']}): throughput {ratio['batching_throughput']:.2f}x, p99 "
          f"{ratio['batching_p99']:.2f}x")
    return out


def _long(args) -> dict:
    """--long N: vitkit alone at one point for N seconds; RSS every 0.5 s; the verdict on the last line."""
    model = args.models[-1]
    name, clients = MODELS[model][0], 32 if 32 in args.clients else args.clients[0]
    settle = min(10.0, args.long / 5)
    with tempfile.TemporaryDirectory() as tmp:
        ckpt, image = checkpoint(name, Path(tmp))
        proc, url = start("vitkit", ckpt, not args.no_fast, args.max_queue, args.precision)
        try:
            prec = picked_precision(url)["precision"]
            ready = rss(proc.pid)
            print(f"# {name} at {clients} clients for {args.long:g} s, vitkit at precision {prec}; RSS when ready "
                  f"{ready.get('VmRSS', float('nan')):.0f} MB (peak so far {ready.get('VmHWM', float('nan')):.0f})",
                  flush=True)
            row = long_run(url, proc.pid, image, clients, args.long, settle)
        finally:
            proc.terminate()
            proc.wait(15)
    row.update(model=name, clients=clients, precision=prec, settle_s=settle, ready_rss_mb=ready.get("VmRSS"),
               ready_peak_mb=ready.get("VmHWM"))
    if args.json:
        Path(args.json).write_text(json.dumps(row, indent=2))
    print(f"{name} vitkit {clients} clients: {row['req_s']:.1f} req/s  p99 {row['p99_ms']:.0f} ms  errors "
          f"{row['errors']}  {row['requests']} requests")
    print(f"RSS over {args.long:g} s at {clients} clients on {name}, after the first {settle:g} s: "
          f"{row['rss_start_mb']:.0f} → {row['rss_end_mb']:.0f} MB (range {row['rss_min_mb']:.0f}-"
          f"{max(row['rss_first_half_max_mb'], row['rss_second_half_max_mb']):.0f}; highest in the first half "
          f"{row['rss_first_half_max_mb']:.0f}, second half {row['rss_second_half_max_mb']:.0f}), peak "
          f"{row['peak_start_mb']:.0f} → {row['peak_mb']:.0f} ({row['ready_peak_mb']:.0f} when ready): "
          + (f"flat (within {row['bound_mb']:.0f} MB)" if row["flat"] else
             f"NOT flat (grew more than {row['bound_mb']:.0f} MB)"))
    return row


if __name__ == "__main__":
    main()
