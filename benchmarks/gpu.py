"""GPU: ViT-B/16 at 224 px in bf16 with torch.compile: training and inference img/s, and model FLOPs utilisation
(MFU: analytic model FLOPs per second over the card's dense bf16 peak), vitkit vs timm, interleaved.

    python benchmarks/gpu.py                      # skips (exit 0, says so) where there is no CUDA device
    python benchmarks/gpu.py --peak-tflops 989    # a card missing from PEAKS below

Then inference through `vitkit.optimize` (torch.compile with freezing and CUDA graphs) in fp32, bf16 and `auto`
at batch 1 and --infer-batch, against timm compiled fp32 and bf16 (`--no-optimize` skips it). The last line gives
vitkit/timm for training and inference, then each optimize precision over timm compiled fp32.

Training FLOPs are counted as 3x the forward (forward + backward), attention included, as in count_flops.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402,F401  (puts src/ on the path)

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from vitkit.models import count_flops, create_model, get_config  # noqa: E402

# dense (no sparsity) bf16 tensor-core peaks, TFLOP/s, from the vendors' data sheets
PEAKS = {"H200": 989.0, "H100 SXM": 989.0, "H100 80GB HBM3": 989.0, "H100 PCIe": 756.0, "H100 NVL": 835.0,
         "H100": 989.0, "A100": 312.0, "L40S": 362.0, "L4": 121.0, "A10G": 70.0, "RTX 4090": 165.0}


def peak_tflops(name: str) -> float:
    for key in sorted(PEAKS, key=len, reverse=True):
        if key.lower() in name.lower():
            return PEAKS[key]
    return 0.0


def timed(fn, steps: int) -> float:
    torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(steps):
        fn()
    torch.cuda.synchronize()
    return (time.perf_counter() - t) / steps


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="vit_base_patch16_224")
    p.add_argument("--train-batch", type=int, default=256)
    p.add_argument("--infer-batch", type=int, default=512)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--peak-tflops", type=float, default=0.0)
    p.add_argument("--no-timm", action="store_true")
    p.add_argument("--optimize", action=argparse.BooleanOptionalAction, default=True,
                   help="also inference through vitkit.optimize (fp32, bf16, auto; CUDA graphs) at batch 1 and "
                        "--infer-batch against timm compiled")
    a = p.parse_args(argv)
    if not torch.cuda.is_available():
        print("SKIPPED: no CUDA device here; this benchmark needs a GPU (see benchmarks/RESULTS.md)")
        return 0
    dev = torch.device("cuda")
    name = torch.cuda.get_device_name()
    peak = a.peak_tflops or peak_tflops(name)
    print(f"# gpu.py on {name}, torch {torch.__version__}, dense bf16 peak {peak or 'unknown'} TFLOP/s")
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True
    fwd = count_flops(get_config(a.model))["flops"]

    libs = {"vitkit": lambda: create_model(a.model)}
    if not a.no_timm:
        import timm
        libs["timm"] = lambda: timm.create_model(a.model, pretrained=False)
    train_fns, infer_fns = {}, {}
    for lib, build in libs.items():
        m = build().to(dev)
        opt = torch.optim.AdamW(m.parameters(), lr=1e-4, fused=True)
        cm = torch.compile(m)
        x = torch.randn(a.train_batch, 3, 224, 224, device=dev)
        y = torch.randint(0, 1000, (a.train_batch,), device=dev)

        def train_step(cm=cm, opt=opt, x=x, y=y):
            with torch.autocast("cuda", dtype=torch.bfloat16):
                loss = F.cross_entropy(cm(x), y)
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
        mi = build().to(dev).eval().to(torch.bfloat16)
        ci = torch.compile(mi, mode="max-autotune-no-cudagraphs")
        xi = torch.randn(a.infer_batch, 3, 224, 224, device=dev, dtype=torch.bfloat16)

        def infer_step(ci=ci, xi=xi):
            with torch.inference_mode():
                ci(xi)
        for f in (train_step, infer_step):  # compile and warm up
            for _ in range(3):
                f()
        train_fns[lib], infer_fns[lib] = train_step, infer_step

    results = {}
    for kind, fns, batch, mult in (("train", train_fns, a.train_batch, 3), ("infer", infer_fns, a.infer_batch, 1)):
        times = {k: [] for k in fns}
        for _ in range(a.rounds):
            for k, f in fns.items():
                times[k].append(timed(f, a.steps))
        for k, ts in times.items():
            t = statistics.median(ts)
            tflops = mult * fwd * batch / t / 1e12
            results[(kind, k)] = batch / t
            mfu = f"{100 * tflops / peak:.1f}% MFU" if peak else "MFU n/a (unknown peak)"
            print(f"{kind:5s} {k:6s} batch {batch}: {batch / t:8.1f} img/s, {tflops:6.1f} TFLOP/s, {mfu}")
    print(f"peak memory {torch.cuda.max_memory_allocated() / 2**30:.1f} GiB")
    ratios = optimize_rows(a, dev) if a.optimize else {}
    if "timm" in libs:
        print("ratio vitkit/timm (img/s): " + ", ".join(
            [f"{kind} {results[(kind, 'vitkit')] / results[(kind, 'timm')]:.3f}" for kind in ("train", "infer")] +
            [f"{k} {v:.2f}" for k, v in ratios.items()]))
    return 0


def optimize_rows(a, dev) -> dict:
    """Inference through `vitkit.optimize` on the GPU (the compile backend: freezing and CUDA graphs) in fp32, bf16
    and `auto`, against timm compiled fp32 (and bf16 autocast), fp32 weights, interleaved; img/s per batch size."""
    import copy

    import vitkit

    out = {}
    ref = create_model(a.model).to(dev).eval()
    for batch in (1, a.infer_batch):
        x = torch.randn(batch, 3, 224, 224, device=dev)
        fns = {}
        if not a.no_timm:
            import timm
            tm = timm.create_model(a.model, pretrained=False).to(dev).eval()
            tm.load_state_dict(ref.state_dict())
            tc = torch.compile(tm)

            def timm_fp32(tc=tc, x=x):
                with torch.inference_mode():
                    return tc(x)

            def timm_bf16(tc=tc, x=x):
                with torch.inference_mode(), torch.autocast("cuda", dtype=torch.bfloat16):
                    return tc(x)
            fns["timm compiled fp32"], fns["timm compiled bf16"] = timm_fp32, timm_bf16
        for prec in ("fp32", "bf16", "auto"):
            om = vitkit.optimize(copy.deepcopy(ref), precision=prec)
            fns[f"vitkit {prec}"] = (lambda om=om, x=x: om(x))
        for f in fns.values():  # compile, capture the graphs, warm up (auto measures its candidates here)
            for _ in range(3):
                f()
        steps = max(3, a.steps if batch > 1 else 10 * a.steps)
        times = {k: [] for k in fns}
        for _ in range(a.rounds):
            for k, f in fns.items():
                times[k].append(timed(f, steps))
        base = batch / statistics.median(times["timm compiled fp32"]) if "timm compiled fp32" in times else None
        for k, ts in times.items():
            rate = batch / statistics.median(ts)
            rel = f", {rate / base:.2f}x timm compiled fp32" if base else ""
            print(f"infer {k:20s} batch {batch}: {rate:9.1f} img/s{rel}")
            if base and k.startswith("vitkit") and k != "vitkit fp32":
                out[f"{k.split()[1]} b{batch}"] = rate / base
    return out


if __name__ == "__main__":
    sys.exit(main())
