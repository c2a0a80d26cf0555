"""Inference speed, vitkit vs timm, identical weights, interleaved in one process (see common.py).

Rows: each model at each batch size, fp32: eager (vitkit vs timm), the fast paths (vitkit.optimize on its default
backend and with backend="compile", against timm under torch.compile with inductor freezing), bf16 autocast where the
CPU has native bf16, and token merging (vitkit.optimize with tome_r) against the plain model. Columns: median img/s,
GFLOP/s (the model's analytic FLOPs, math attention counted, whether or not a path skips some), fraction of a 2048^3
fp32 matmul measured in the same turns, peak extra memory. The last line is the eager ratio vitkit/timm.

The process starts with `vitkit.models.fast.tune_malloc()` (what `optimize` does on a CPU) so that every row, timm's
included, runs with the same allocator; `--no-tune-malloc` measures glibc's default instead.

    python benchmarks/infer.py                 # the full run (~20-40 min on 2 busy cores)
    python benchmarks/infer.py --quick         # seconds: small shapes, proves the script works
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import QUICK_MM, bf16_fast, interleave, machine, mib, peak_memory, summarize, table  # noqa: E402

import timm  # noqa: E402
import torch  # noqa: E402

import vitkit  # noqa: E402
from vitkit.models import create_model, get_config  # noqa: E402
from vitkit.models.fast import compile_frozen, tune_malloc  # noqa: E402
from vitkit.models.tome import apply_tome, tome_flops  # noqa: E402

MEM_SETUP = """
kw = spec["kw"]
if spec["lib"] == "timm":
    import timm
    m = timm.create_model(spec["name"], pretrained=False, **kw).eval()
else:
    from vitkit.models import create_model
    m = create_model(spec["name"], **kw).eval()
x = torch.randn(spec["batch"], 3, spec["img"], spec["img"])
def step():
    with torch.inference_mode():
        m(x)
"""


def pair(name: str, **kw):
    ref = timm.create_model(name, pretrained=False, **kw).eval()
    ours = create_model(name, **kw).eval()
    ours.load_state_dict(ref.state_dict())
    return ours, ref


def executed_flops(model, img: int) -> float:
    """FLOPs per image that vitkit.optimize's oneDNN path executes: the model's, less the last block's queries,
    attention, projection and MLP for the non-prefix tokens (their outputs are never read under token pooling)."""
    cfg = model.config
    counted = vitkit.count_flops(cfg, img)
    total = counted["flops"]
    if model.global_pool != "token":
        return total
    n, p, d = counted["tokens"], model.num_prefix_tokens, cfg.embed_dim
    f = int(d * cfg.mlp_ratio)
    skipped = (n - p) * (d * d + 2 * n * d + d * d + 2 * d * f)
    return total - 2.0 * skipped


def no_grad(fn, x):
    def run():
        with torch.inference_mode():
            return fn(x)
    return run


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", nargs="+", default=["vit_tiny_patch16_224", "vit_small_patch16_224",
                                                   "vit_base_patch16_224"])
    p.add_argument("--batches", nargs="+", type=int, default=[1, 32])
    p.add_argument("--img", type=int, default=224)
    p.add_argument("--reps", type=int, default=0, help="timed turns per candidate (0: 20 at batch 1, 5 above)")
    p.add_argument("--compile", choices=["none", "largest-batch", "all"], default="largest-batch",
                   help="compiled rows: none, only at the largest batch (default), or at every batch")
    p.add_argument("--compile-models", nargs="*", default=["vit_small_patch16_224"],
                   help="models that get compiled rows (compiling takes minutes on 2 busy cores); 'all' for every one")
    p.add_argument("--no-bf16", action="store_true", help="skip the bf16 rows (measured at the largest batch where "
                   "the CPU has native bf16)")
    p.add_argument("--tome-r", nargs="*", type=int, default=[8, 13, 16],
                   help="ToMe r values, measured on the last model at the largest batch")
    p.add_argument("--no-memory", action="store_true", help="skip the peak-memory children")
    p.add_argument("--threads", type=int, default=0)
    p.add_argument("--no-tune-malloc", action="store_true", help="keep glibc's default allocator settings")
    p.add_argument("--json", help="also write the figures here")
    p.add_argument("--quick", action="store_true", help="tiny shapes, 2 turns: checks the script, not the speed")
    a = p.parse_args(argv)
    if a.quick:
        a.models, a.batches, a.img, a.reps, a.compile, a.tome_r = ["vit_tiny_patch16_224"], [2], 64, 2, "none", [2]
        a.no_memory = True  # highres.py --quick exercises the memory child
        a.threads = a.threads or 1  # small ops on busy cores: one thread avoids OpenMP barrier stalls
    if a.threads:
        torch.set_num_threads(a.threads)
    tuned = False if a.no_tune_malloc else tune_malloc()
    mm = QUICK_MM if a.quick else 2048  # the reference matmul's size
    torch.manual_seed(0)
    print(f"# infer.py on {machine()}; allocator tuned: {tuned}", flush=True)
    rows, results, eager_ratios, compiled_ratios = [], [], [], []

    def record(label, name, batch, s, mem=None):
        results.append(dict(label=label, model=name, batch=batch, mem_bytes=mem, **s))
        rows.append([name.replace("_patch16_224", ""), batch, label, f"{s['items_per_s']:.1f}",
                     f"{s.get('gflops', 0):.0f}", f"{100 * s.get('frac_matmul', 0):.0f}%",
                     f"{s.get('mm_gflops', 0):.0f}", mib(mem) if mem is not None else "-"])
        print(" | ".join(str(c) for c in rows[-1]), flush=True)

    for name in a.models:
        kw = {"img_size": a.img} if a.img != 224 else {}
        ours, ref = pair(name, **kw)
        flops_img = vitkit.count_flops(get_config(name, **kw), a.img)["flops"]
        for batch in a.batches:
            reps = a.reps or (20 if batch == 1 else 5)
            x = torch.randn(batch, 3, a.img, a.img)
            fl = flops_img * batch
            with torch.inference_mode():
                assert (ours(x) - ref(x)).abs().max().item() <= 1e-4
            mem = {}
            if not a.no_memory and (batch == max(a.batches)):
                mem = dict(zip(("vitkit", "timm"), peak_memory(MEM_SETUP, [
                    dict(lib=lib, name=name, kw=kw, batch=batch, img=a.img) for lib in ("vitkit", "timm")])))
            r = interleave({"vitkit": no_grad(ours, x), "timm": no_grad(ref, x)}, reps, mm_n=mm)
            sv, st = summarize(r["vitkit"], batch, fl), summarize(r["timm"], batch, fl)
            record("vitkit eager", name, batch, sv, mem.get("vitkit"))
            record("timm eager", name, batch, st, mem.get("timm"))
            eager_ratios.append((name, batch, sv["items_per_s"] / st["items_per_s"], sv["norm"] / st["norm"]))

            compile_here = a.compile == "all" or (a.compile == "largest-batch" and batch == max(a.batches))
            if compile_here and (name in a.compile_models or "all" in a.compile_models):
                fast = vitkit.optimize(ours, tune_allocator=not a.no_tune_malloc)
                fast_c = vitkit.optimize(ours, backend="compile", tune_allocator=not a.no_tune_malloc)
                tc = compile_frozen(copy.deepcopy(ref))  # the same freezing as ours
                with torch.inference_mode():
                    plain = ours(x)
                    diff = (fast(x) - plain).abs().max().item()
                    diff_c = (fast_c(x) - plain).abs().max().item()
                    tc(x)
                r = interleave({"vitkit": lambda: fast(x), "vitkit compile": lambda: fast_c(x),
                                "timm": lambda: tc(x)}, reps, mm_n=mm)
                sv, sc, st = (summarize(r[k], batch, fl) for k in ("vitkit", "vitkit compile", "timm"))
                ex = executed_flops(ours, a.img) * batch if fast.backend == "onednn" else fl
                sv["frac_matmul_executed"] = sv["frac_matmul"] * ex / fl
                record(f"vitkit.optimize [{fast.backend}] (max diff {diff:.1e}; executes {ex / fl:.1%} of the "
                       f"FLOPs: {100 * sv['frac_matmul_executed']:.0f}% of matmul on those)", name, batch, sv)
                record(f"vitkit.optimize [compile] (max diff {diff_c:.1e})", name, batch, sc)
                record("timm compile+freezing", name, batch, st)
                compiled_ratios.append((name, batch, sv["frac_matmul"], st["frac_matmul"]))

            if bf16_fast() and not a.quick and not a.no_bf16 and batch == max(a.batches):
                def amp(m):
                    def run():
                        with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16):
                            return m(x)
                    return run
                r = interleave({"vitkit": amp(ours), "timm": amp(ref)}, reps, mm_n=mm)
                record("vitkit eager bf16 autocast", name, batch, summarize(r["vitkit"], batch, fl))
                record("timm eager bf16 autocast", name, batch, summarize(r["timm"], batch, fl))

    # token merging: the last model, the largest batch
    tome = {}
    if a.tome_r:
        name, batch = a.models[-1], max(a.batches)
        x = torch.randn(batch, 3, a.img, a.img)
        cands = {"plain": no_grad(ours, x), "timm": no_grad(ref, x)}
        flops = {"plain": flops_img * batch, "timm": flops_img * batch}
        for r_ in a.tome_r:
            m = apply_tome(copy.deepcopy(ours), r_)
            cands[f"r={r_}"] = no_grad(m, x)
            flops[f"r={r_}"] = tome_flops(m, a.img) * batch
        if a.compile != "none":
            r_ = max(a.tome_r)
            fast = vitkit.optimize(ours, tome_r=r_)
            fast(x)
            cands[f"optimize r={r_}"] = lambda: fast(x)
            flops[f"optimize r={r_}"] = flops[f"r={r_}"]
        res = interleave(cands, a.reps or 3, mm_n=mm)
        base = summarize(res["plain"], batch)["items_per_s"]
        tbase = summarize(res["timm"], batch)["items_per_s"]
        for k, v in res.items():
            s = summarize(v, batch, flops[k])
            nb, nt = summarize(res["plain"], batch)["norm"], summarize(res["timm"], batch)["norm"]
            tome[k] = dict(speedup_vs_plain=s["items_per_s"] / base, speedup_vs_timm=s["items_per_s"] / tbase,
                           norm_speedup_vs_plain=s["norm"] / nb, norm_speedup_vs_timm=s["norm"] / nt, **s)
            record(f"ToMe {k}: x{s['items_per_s'] / base:.2f} ({s['norm'] / nb:.2f} normalized) vs vitkit eager, "
                   f"x{s['items_per_s'] / tbase:.2f} ({s['norm'] / nt:.2f}) vs timm"
                   if k not in ("plain", "timm") else f"ToMe set: {k} eager", name, batch, s)

    print()
    print(table(rows, ["model", "batch", "path", "img/s", "GFLOP/s", "of matmul", "matmul GFLOP/s", "peak mem"]))
    worst = min(min(r, q) for _, _, r, q in eager_ratios)
    summary = ", ".join(f"{n.replace('_patch16_224', '')} b{b} {r:.3f} ({q:.3f})" for n, b, r, q in eager_ratios)
    out = dict(machine=machine(), results=results, eager_ratios=eager_ratios, tome=tome,
               compiled=compiled_ratios, malloc_tuned=tuned)
    for n, b, fv, ft in compiled_ratios:
        print(f"fast path {n.replace('_patch16_224', '')} b{b}: vitkit.optimize {100 * fv:.1f}% of the same-run "
              f"matmul, timm compile+freezing {100 * ft:.1f}%")
    if a.json:
        with open(a.json, "w") as f:
            json.dump(out, f, indent=1)
    print(f"ratio vitkit/timm (eager fp32, median img/s (matmul-normalized)): {summary}; min {worst:.3f}")
    return out


if __name__ == "__main__":
    main()
