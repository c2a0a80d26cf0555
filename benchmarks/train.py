"""Training speed and memory, vitkit vs timm, identical weights and batches: img/s of full steps (forward, loss,
backward, AdamW) interleaved in one process, with and without activation checkpointing, and each step's peak
extra memory (child process, see common.py). Default model: the 2.7M-parameter ViT for 32x32 inputs (patch 4,
dim 192, depth 6, 3 heads). The last line is the ratio vitkit/timm.

    python benchmarks/train.py                                    # ~2-4 min on 2 busy cores
    python benchmarks/train.py --model vit_small_patch16_224 --batch 16 --img 224
    python benchmarks/train.py --quick
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
import torch.nn.functional as F  # noqa: E402

from vitkit.models import count_flops, create_model, get_config  # noqa: E402

BUILD = """
def build(lib, name, img, ckpt, num_classes, depth=None):
    kw = dict(img_size=img, num_classes=num_classes)
    if depth:
        kw["depth"] = depth
    if lib == "timm":
        import timm
        from vitkit.models import get_config
        c = get_config(name)
        m = timm.models.vision_transformer.VisionTransformer(
            img_size=img, patch_size=c.patch_size, in_chans=c.in_chans, embed_dim=c.embed_dim,
            depth=depth or c.depth, num_heads=c.num_heads, num_classes=num_classes)
    else:
        from vitkit.models import create_model
        m = create_model(name, **kw)
    m.set_grad_checkpointing(ckpt)
    return m.train()
"""

MEM = BUILD + """
m = build(spec["lib"], spec["name"], spec["img"], spec["ckpt"], spec["classes"], spec["depth"])
opt = torch.optim.AdamW(m.parameters(), lr=1e-4)
for p in m.parameters():
    p.grad = torch.zeros_like(p)
opt.step()  # optimizer state allocated before the measured step
from vitkit.models import get_config
x = torch.randn(spec["batch"], get_config(spec["name"]).in_chans, spec["img"], spec["img"])
y = torch.randint(0, spec["classes"], (spec["batch"],))
def step():
    torch.nn.functional.cross_entropy(m(x), y).backward()
    opt.step()
"""

exec(BUILD)  # the same builder in this process


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="vit_mini_patch4_32")
    p.add_argument("--img", type=int, default=0, help="image size (0: the model's)")
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--classes", type=int, default=10)
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--depth", type=int, default=0, help="override the model's depth (0: keep)")
    p.add_argument("--threads", type=int, default=0)
    p.add_argument("--json")
    p.add_argument("--quick", action="store_true")
    a = p.parse_args(argv)
    if a.quick:
        a.batch, a.reps, a.depth = 8, 2, 2
        a.threads = a.threads or 1
    if a.threads:
        torch.set_num_threads(a.threads)
    mm = QUICK_MM if a.quick else 2048  # the reference matmul's size
    cfg = get_config(a.model)
    img = a.img or cfg.grid_size[0] * cfg.patch_size
    print(f"# train.py on {machine()}", flush=True)
    torch.manual_seed(0)
    x = torch.randn(a.batch, cfg.in_chans, img, img)
    y = torch.randint(0, a.classes, (a.batch,))
    cfg = cfg.replace(num_classes=a.classes, img_size=img, depth=a.depth or cfg.depth)
    fl = 3 * count_flops(cfg)["flops"] * a.batch  # fwd + 2x bwd
    rows, out, ratios = [], {"machine": machine(), "rows": []}, []
    keys = [(k, c) for c in (False, True) for k in ("vitkit", "timm")]
    mem = dict(zip(keys, peak_memory(MEM, [dict(lib=k, name=a.model, img=img, ckpt=c, batch=a.batch,
                                                classes=a.classes, depth=a.depth) for k, c in keys])))
    for ckpt in (False, True):
        models = {lib: build(lib, a.model, img, ckpt, a.classes, a.depth) for lib in ("vitkit", "timm")}
        models["timm"].load_state_dict(models["vitkit"].state_dict())
        opts = {k: torch.optim.AdamW(m.parameters(), lr=1e-4) for k, m in models.items()}

        def step(k):
            def f():
                opts[k].zero_grad(set_to_none=True)
                F.cross_entropy(models[k](x), y).backward()
                opts[k].step()
            return f
        r = interleave({k: step(k) for k in models}, a.reps, mm_n=mm)
        s = {k: summarize(r[k], a.batch, fl) for k in models}
        for k in models:
            m = mem[(k, ckpt)]
            rows.append([k, "yes" if ckpt else "no", f"{s[k]['items_per_s']:.1f}", f"{s[k]['gflops']:.0f}",
                         f"{100 * s[k]['frac_matmul']:.0f}%", mib(m)])
            out["rows"].append(dict(lib=k, ckpt=ckpt, peak_bytes=m, **s[k]))
            print(" | ".join(rows[-1]), flush=True)
        ratios.append((ckpt, s["vitkit"]["items_per_s"] / s["timm"]["items_per_s"]))
    print()
    print(f"{a.model} at {img} px, batch {a.batch}, AdamW; FLOPs counted as 3x the forward")
    print(table(rows, ["lib", "act. ckpt", "img/s", "GFLOP/s", "of matmul", "peak step memory"]))
    if a.json:
        with open(a.json, "w") as f:
            json.dump(out, f, indent=1)
    print("ratio vitkit/timm (train img/s, median): "
          + ", ".join(f"{'with' if c else 'without'} checkpointing {r:.3f}" for c, r in ratios))
    return out


if __name__ == "__main__":
    main()
