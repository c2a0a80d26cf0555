"""High resolution, ViT-B/16: inference time and peak memory at 224, 512, 1024 and 1536 px (197 to 9,217 tokens),
vitkit vs timm (both on fused scaled-dot-product attention, so no N x N matrix is stored), and vitkit's training
activation memory at 512 px with and without activation checkpointing. Timing interleaved in one process;
memory in a child process (see common.py). The last line is the ratio vitkit/timm.

    python benchmarks/highres.py            # full (~10-20 min on 2 busy cores: 1536 px is ~4.7 TFLOP an image)
    python benchmarks/highres.py --quick    # ViT-Ti at 64/128 px, seconds
"""
from __future__ import annotations

import argparse
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import QUICK_MM, interleave, machine, mib, peak_memory, summarize, table  # noqa: E402

import timm  # noqa: E402
import torch  # noqa: E402

from vitkit.models import count_flops, create_model, get_config  # noqa: E402

INFER = """
if spec["lib"] == "timm":
    import timm
    m = timm.create_model(spec["name"], pretrained=False, img_size=spec["img"]).eval()
else:
    from vitkit.models import create_model
    m = create_model(spec["name"], img_size=spec["img"]).eval()
x = torch.randn(spec["batch"], 3, spec["img"], spec["img"])
def step():
    with torch.inference_mode():
        m(x)
"""

TRAIN = """
from vitkit.models import create_model
m = create_model(spec["name"], img_size=spec["img"]).train()
m.set_grad_checkpointing(spec["ckpt"])
for p in m.parameters():
    p.grad = torch.zeros_like(p)  # gradients exist before the step: the figure is activations (+ temporaries)
x = torch.randn(spec["batch"], 3, spec["img"], spec["img"])
y = torch.randint(0, 1000, (spec["batch"],))
def step():
    torch.nn.functional.cross_entropy(m(x), y).backward()
"""


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="vit_base_patch16_224")
    p.add_argument("--sizes", nargs="+", type=int, default=[224, 512, 1024, 1536])
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--reps", type=int, default=0, help="timed turns (0: 3 up to 512 px, 1 above)")
    p.add_argument("--train-size", type=int, default=512)
    p.add_argument("--train-batch", type=int, default=2)
    p.add_argument("--threads", type=int, default=0)
    p.add_argument("--json")
    p.add_argument("--quick", action="store_true")
    a = p.parse_args(argv)
    if a.quick:
        a.model, a.sizes, a.reps, a.train_size, a.train_batch, a.batch = "vit_tiny_patch16_224", [64, 192], 1, 96, 2, 2
        a.threads = a.threads or 1
    if a.threads:
        torch.set_num_threads(a.threads)
    mm = QUICK_MM if a.quick else 2048  # the reference matmul's size
    print(f"# highres.py on {machine()}", flush=True)
    rows, out = [], {"machine": machine(), "infer": [], "train": {}}
    ratios = []
    specs = [dict(lib=lib, name=a.model, img=img, batch=a.batch) for img in a.sizes for lib in ("vitkit", "timm")]
    specs += [dict(name=a.model, img=a.train_size, batch=a.train_batch, ckpt=c) for c in (False, True)]
    mems = peak_memory([INFER] * (len(specs) - 2) + [TRAIN] * 2, specs)  # one child process for all
    for i, img in enumerate(a.sizes):
        ours = create_model(a.model, img_size=img).eval()
        ref = timm.create_model(a.model, pretrained=False, img_size=img).eval()
        ref.load_state_dict(ours.state_dict())
        x = torch.randn(a.batch, 3, img, img)
        reps = a.reps or (3 if img <= 512 else 1)
        mem = mems[2 * i: 2 * i + 2]

        def run(m):
            def f():
                with torch.inference_mode():
                    return m(x)
            return f
        r = interleave({"vitkit": run(ours), "timm": run(ref)}, reps, warmup=1 if img <= 512 else 0, mm_n=mm)
        fl = count_flops(get_config(a.model), img)["flops"] * a.batch
        sv, st = summarize(r["vitkit"], a.batch, fl), summarize(r["timm"], a.batch, fl)
        tokens = (img // 16) ** 2 + 1
        for lib, s, m in (("vitkit", sv, mem[0]), ("timm", st, mem[1])):
            rows.append([img, tokens, lib, f"{s['median_s']:.2f}", f"{s['gflops']:.0f}",
                         f"{100 * s['frac_matmul']:.0f}%", mib(m)])
            out["infer"].append(dict(img=img, tokens=tokens, lib=lib, peak_bytes=m, **s))
            print(" | ".join(str(c) for c in rows[-1]), flush=True)
        ratios.append((img, st["median_s"] / sv["median_s"], mem[0] / max(mem[1], 1)))
        del ours, ref

    plain, ckpt = mems[-2:]
    out["train"] = dict(img=a.train_size, batch=a.train_batch, plain_bytes=plain, ckpt_bytes=ckpt,
                        reduction=plain / ckpt)
    print()
    print(table(rows, ["px", "tokens", "lib", "s/batch", "GFLOP/s", "of matmul", "peak mem (inference)"]))
    print(f"\ntraining step (forward+backward) at {a.train_size} px, batch {a.train_batch}, peak activation memory: "
          f"plain {mib(plain)}, activation checkpointing {mib(ckpt)}: {plain / ckpt:.1f}x less")
    if a.json:
        with open(a.json, "w") as f:
            json.dump(out, f, indent=1)
    print("ratio vitkit/timm (speed, memory): "
          + ", ".join(f"{img} px x{s:.3f} speed, x{m:.2f} memory" for img, s, m in ratios))
    return out


if __name__ == "__main__":
    main()
