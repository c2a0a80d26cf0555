"""Reduced-precision inference: vitkit.optimize in fp32, bf16 and int8 (and what `auto` picks) against timm fp32
eager and timm compiled (inductor with freezing), identical weights, interleaved in one process (see common.py).

Speed rows, per model and batch: img/s (median), the ratio to timm compiled fp32 and to vitkit's own fp32
`optimize`, and the fraction of this machine's fastest GEMM *of the same precision* (the "of matmul" reference:
for fp32 the faster of MKL (`torch.mm`) and oneDNN (prepacked `mkldnn._linear_pointwise`), for bf16 the faster of
ATen's bf16 `torch.mm` and oneDNN's prepacked bf16 matmul, for int8 the faster of oneDNN's u8s8 matmul
(`onednn::qlinear_pointwise`) and fbgemm's dynamic quantised linear, each at 2048^3, measured in the same turns,
before and again after the speed rows, each GEMM at its fastest turn: a peak, so no row reads above 100%).

Accuracy rows (real labelled images; optional): `--checkpoint RUN --data SPEC` (e.g. the demo run on mnist5k) and
`--timm-checkpoint FILE --timm-model NAME --folder DIR` (an imported ImageNet model on a labelled folder whose
sub-folders are class indices): top-1 of each precision and its change from fp32; `--retrieval` adds recall@1 of
the checkpoint's embeddings in each precision (eval-retrieval on --data).

    python benchmarks/precision.py                                   # ViT-S/16 and ViT-B/16 at batch 1 and 32
    python benchmarks/precision.py --checkpoint runs/demo --data mnist5k --retrieval
    python benchmarks/precision.py --quick                           # seconds: proves the script works

The last line is the fastest vitkit path's speed-up over timm compiled fp32 and over vitkit fp32, for the last
model at the last batch (ViT-B/16 at 32 by default).
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import statistics
import sys
import time
import warnings
from typing import Optional

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import QUICK_MM, fp32_gemms, interleave, machine, summarize, table  # noqa: E402

import timm  # noqa: E402
import torch  # noqa: E402

import vitkit  # noqa: E402
from vitkit.models import create_model, get_config  # noqa: E402
from vitkit.models.fast import compile_frozen, int8_fused_available, kept_precision_for, tune_malloc  # noqa: E402
from vitkit.models.precision import bf16_native  # noqa: E402

PRECISIONS = ("fp32", "bf16", "int8")


# ---- the GEMM references -----------------------------------------------------------------------------------------
def gemms(n: int) -> dict:
    """name → (precision, callable) for every n^3 GEMM this machine offers (the candidates of 'of matmul')."""
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(n, n, generator=g), torch.randn(n, n, generator=g)
    out = {f"fp32 {k}": ("fp32", fn) for k, fn in fp32_gemms(a, b).items()}
    if bf16_native(torch.device("cpu")):
        ab, bb = a.bfloat16(), b.bfloat16()
        out["bf16 torch.mm"] = ("bf16", lambda: torch.mm(ab, bb))
        wpb = torch.ops.mkldnn._reorder_linear_weight(bb.t().contiguous())
        out["bf16 oneDNN"] = ("bf16", lambda: torch.ops.mkldnn._linear_pointwise(ab, wpb, None, "none", [], ""))
    w = b.t().contiguous()
    ws = w.abs().amax(1) / 127
    qw = torch.round(w / ws[:, None]).to(torch.int8)
    if int8_fused_available():
        packed = torch.ops.onednn.qlinear_prepack(qw, None)
        qa = torch.randint(0, 255, (n, n), dtype=torch.uint8, generator=g)
        zp = torch.zeros(n, dtype=torch.long)
        out["int8 oneDNN u8s8"] = ("int8", lambda: torch.ops.onednn.qlinear_pointwise(
            qa, 0.02, 128, packed, ws, zp, None, 1.0, 0, torch.float32, "none", [], ""))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        lin = torch.ao.nn.quantized.dynamic.Linear(n, n, dtype=torch.qint8)
        lin.set_weight_bias(torch.quantize_per_channel(w, ws.double(), torch.zeros(n, dtype=torch.long), 0,
                                                       torch.qint8), None)
    out["int8 fbgemm dynamic"] = ("int8", lambda: lin(a))
    return out


def matmul_refs(n: int, reps: int, best: Optional[dict] = None) -> dict:
    """precision → (GFLOP/s, which GEMM): the fastest GEMM of each precision, every GEMM timed in turns and taken at
    its fastest turn (a peak, so that no row of a noisy machine reads above 100%); `best`: references measured
    earlier in the run, kept where faster."""
    cands = gemms(n)
    with torch.inference_mode():
        r = interleave({k: fn for k, (_, fn) in cands.items()}, reps, mm_n=QUICK_MM)
    flops = 2 * n ** 3
    best = dict(best or {})
    for k, (p, _) in cands.items():
        gf = flops / min(r[k]["times"]) / 1e9
        print(f"  GEMM {n}^3 {k}: {gf:.0f} GFLOP/s", flush=True)
        if gf > best.get(p, (0, ""))[0]:
            best[p] = (gf, k)
    return best


def int8_mixed(model, cal: torch.Tensor, keep_fc2: float):
    """Calibrated int8 (on `cal`, 32 images: fc2's input range static) with the fc2 of `keep_fc2` of the blocks
    (evenly spread) kept in the higher precision calibration would pick here (bf16 or fp32, whichever is faster):
    random weights have no outlier channels, so this mirrors the mix a real model's calibration keeps (ViT-Ti/16
    ImageNet: 2 of 12 fc2)."""
    fast = vitkit.optimize(model, precision="int8", calibration=cal)
    plan = copy.deepcopy(fast.int8_plan)
    depth = len(plan.layers)
    kept = kept_precision_for(model)
    for i in {round(j * depth / max(1, round(keep_fc2 * depth))) for j in range(round(keep_fc2 * depth))}:
        plan.layers[min(i, depth - 1)]["fc2"] = kept
    fast.use_int8_plan(plan)
    return fast


# ---- accuracy ----------------------------------------------------------------------------------------------------
def top1(model, xs: torch.Tensor, ys: torch.Tensor, batch: int) -> float:
    with torch.inference_mode():
        pred = torch.cat([model(xs[i:i + batch]).argmax(1) for i in range(0, len(xs), batch)])
    return 100.0 * (pred == ys).float().mean().item()


def accuracy_rows(model, xs, ys, batch, label) -> list:
    """top-1 of the plain model and of optimize in each precision (and auto) on (xs, ys)."""
    rows, base = [], top1(model, xs, ys, batch)
    rows.append([label, "plain fp32", f"{base:.2f}", "-"])
    cal = xs[::9][:256]  # calibration: every 9th image, at most 256 (top-1 is over all, these included)
    for p in PRECISIONS + ("int8 calibrated", "auto"):
        fast = vitkit.optimize(model, precision=p.split()[0], calibration=cal if p != "int8" else None)
        t = top1(fast, xs, ys, batch)
        name = f"auto → {fast.precision}" if p == "auto" else p
        if fast.int8_plan is not None and fast.precision == "int8":
            name += f" ({fast.int8_plan.summary()})"
        rows.append([label, name, f"{t:.2f}", f"{t - base:+.2f}"])
        print(" | ".join(rows[-1]), flush=True)
    return rows


def load_folder(folder: str, model, limit: int):
    """A labelled folder (sub-folders named by class index) → preprocessed images and labels."""
    from pathlib import Path

    from vitkit.data import eval_transform
    from vitkit.data.images import read_image
    from vitkit.models import Preprocessing

    tf = eval_transform(Preprocessing.of(model), model.config.img_size)
    xs, ys = [], []
    for d in sorted(p for p in Path(folder).iterdir() if p.is_dir()):
        for f in sorted(d.iterdir())[:max(1, limit)]:
            try:
                xs.append(tf(read_image(f, 3)))
                ys.append(int(d.name))
            except Exception:  # noqa: BLE001 - a non-image in the folder
                continue
    return torch.stack(xs), torch.tensor(ys)


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", nargs="*", default=["vit_small_patch16_224", "vit_base_patch16_224"],
                   help="speed rows for these timm model names (none: only the accuracy rows)")
    p.add_argument("--batches", nargs="+", type=int, default=[1, 32])
    p.add_argument("--img", type=int, default=224)
    p.add_argument("--reps", type=int, default=0, help="timed turns per candidate (0: 12 at batch 1, 5 above)")
    p.add_argument("--no-compile", action="store_true", help="skip timm compiled (minutes per shape)")
    p.add_argument("--checkpoint", help="a vitkit run or checkpoint for the accuracy rows (e.g. runs/demo)")
    p.add_argument("--data", default="mnist5k", help="its labelled data (held-out split)")
    p.add_argument("--retrieval", action="store_true", help="also recall@1 per precision (eval-retrieval on --data)")
    p.add_argument("--timm-checkpoint", help="an ImageNet timm/DeiT checkpoint file for the accuracy rows")
    p.add_argument("--timm-model", default="vit_small_patch16_224")
    p.add_argument("--folder", help="labelled images for --timm-checkpoint (sub-folders named by class index)")
    p.add_argument("--per-class", type=int, default=50, help="at most this many images per class of --folder")
    p.add_argument("--keep-fc2", type=float, default=2 / 12, help="the 'int8-mixed' speed row keeps this fraction "
                   "of the blocks' fc2 in bf16 or fp32, whichever is faster here (default 2/12: what calibration kept of "
                   "ViT-Ti/16's on ImageNet)")
    p.add_argument("--json", help="also write the figures here")
    p.add_argument("--quick", action="store_true", help="tiny shapes, 2 turns: checks the script, not the speed")
    a = p.parse_args(argv)
    if a.quick:
        a.models, a.batches, a.img, a.reps, a.no_compile = ["vit_tiny_patch16_224"], [2], 64, 2, True
        torch.set_num_threads(1)
    tune_malloc()
    torch.manual_seed(0)
    print(f"# precision.py on {machine()}", flush=True)
    refs = matmul_refs(QUICK_MM if a.quick else 2048, 2 if a.quick else 5)
    rows, results, headline = [], [], None
    for name in a.models:
        kw = {"img_size": a.img} if a.img != 224 else {}
        ref = timm.create_model(name, pretrained=False, **kw).eval()
        ours = create_model(name, **kw).eval()
        ours.load_state_dict(ref.state_dict())
        flops_img = vitkit.count_flops(get_config(name, **kw), a.img)["flops"]
        cal = torch.randn(2 if a.quick else 32, 3, a.img, a.img)  # int8-mixed's calibration, the same at every batch
        for batch in a.batches:
            x = torch.randn(batch, 3, a.img, a.img)
            fns = {"timm eager fp32": lambda m=ref: m(x)}
            if not a.no_compile:
                tc = compile_frozen(copy.deepcopy(ref))
                t0 = time.perf_counter()
                tc(x)
                print(f"  timm compiled {name} b{batch} in {time.perf_counter() - t0:.0f} s", flush=True)
                fns["timm compiled fp32"] = lambda: tc(x)
            fast = {prec: vitkit.optimize(ours, precision=prec) for prec in PRECISIONS}
            if int8_fused_available():
                fast["int8-mixed"] = int8_mixed(ours, cal, a.keep_fc2)
            for prec, f in fast.items():
                if f.precision == prec.split("-")[0]:
                    f(x)
                    fns[f"vitkit {prec}"] = lambda f=f: f(x)
            with torch.inference_mode():
                r = interleave(fns, a.reps or (12 if batch == 1 else 5), mm_n=QUICK_MM)
            s = {k: summarize(v, batch, flops_img * batch) for k, v in r.items()}
            base_c = s.get("timm compiled fp32", s["timm eager fp32"])["items_per_s"]
            base_v = s["vitkit fp32"]["items_per_s"]
            for k, v in s.items():
                prec = k.split()[-1].split("-")[0]
                ref_gf, ref_name = refs.get(prec, (float("nan"), "?"))
                row = dict(model=name, batch=batch, path=k, img_s=v["items_per_s"], gflops=v["gflops"],
                           vs_timm_compiled=v["items_per_s"] / base_c, vs_vitkit_fp32=v["items_per_s"] / base_v,
                           of_matmul=v["gflops"] / ref_gf, matmul=ref_name)
                results.append(row)
                rows.append([name.replace("_patch16_224", ""), batch, k, f"{v['items_per_s']:.1f}",
                             f"{row['vs_timm_compiled']:.2f}x", f"{row['vs_vitkit_fp32']:.2f}x",
                             f"{100 * row['of_matmul']:.0f}% of {ref_name}"])
                print(" | ".join(str(c) for c in rows[-1]), flush=True)
            auto = vitkit.optimize(ours, precision="auto", calibration=x)
            print(f"  auto (random weights, random images): {auto.choice.summary() if auto.choice else 'fp32'}",
                  flush=True)
            best = max((k for k in s if k.startswith("vitkit")), key=lambda k: s[k]["items_per_s"])
            headline = (name, batch, best, s[best]["items_per_s"] / base_c, s[best]["items_per_s"] / base_v)
    if results:  # the references again after the rows (the machine drifts): each the fastest of both measurements
        print("# 'of matmul' references measured again after the speed rows; the table uses the faster of each")
        refs = matmul_refs(QUICK_MM if a.quick else 2048, 2 if a.quick else 5, refs)
        for row, line in zip(results, rows):
            ref_gf, ref_name = refs.get(row["path"].split()[-1].split("-")[0], (float("nan"), "?"))
            row.update(of_matmul=row["gflops"] / ref_gf, matmul=ref_name)
            line[-1] = f"{100 * row['of_matmul']:.0f}% of {ref_name}"
    print()
    print(table(rows, ["model", "batch", "path", "img/s", "vs timm compiled", "vs vitkit fp32", "of matmul"]))

    acc = []
    if a.checkpoint:
        from vitkit.data import build_datasets, make_loader

        model = vitkit.load(a.checkpoint).eval()
        pre = model.pretrained_cfg
        _, val, _ = build_datasets(a.data, augment="none", mean=pre["mean"], std=pre["std"],
                                   img_size=model.config.img_size, in_chans=model.config.in_chans)
        xs, ys = zip(*make_loader(val, 256, train=False))
        acc += accuracy_rows(model, torch.cat(xs), torch.cat(ys), 256, f"{a.checkpoint} on {a.data}")
        if a.retrieval:
            from vitkit.tasks.retrieve import evaluate_retrieval

            for prec in PRECISIONS:
                res = evaluate_retrieval(a.checkpoint, a.data, progress=False, fast=True, precision=prec)
                acc.append([f"{a.checkpoint} retrieval on {a.data}", f"{res['precision']} recall@1",
                            f"{100 * res['recall@1']:.2f}", "-"])
                print(" | ".join(acc[-1]), flush=True)
    if a.timm_checkpoint:
        from vitkit.io import load_pretrained

        model = load_pretrained(a.timm_checkpoint, model=a.timm_model).eval()
        xs, ys = load_folder(a.folder, model, a.per_class)
        acc += accuracy_rows(model, xs, ys, 32, f"{a.timm_model} ({os.path.basename(a.timm_checkpoint)}) on "
                             f"{len(ys)} images of {a.folder}")
    if acc:
        print()
        print(table(acc, ["model and data", "precision", "top-1 (%)", "change"]))
    if a.json:
        with open(a.json, "w") as f:
            json.dump(dict(machine=machine(), matmul=refs, speed=results, accuracy=acc), f, indent=1)
    if headline is None:  # accuracy rows only: the last one's change from fp32
        print(f"top-1 change of {acc[-1][1]} on {acc[-1][0]}: {acc[-1][3]} points" if acc else "nothing measured")
        return dict(results=results, accuracy=acc)
    n, b, best, vc, vv = headline
    print(f"ratio {n.replace('_patch16_224', '')} b{b}: {best} is {vc:.2f}x timm "
          f"{'eager' if a.no_compile else 'compiled'} fp32 and {vv:.2f}x vitkit fp32")
    return dict(results=results, accuracy=acc)


if __name__ == "__main__":
    main()
