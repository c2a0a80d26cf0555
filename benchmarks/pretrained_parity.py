"""Max abs logit difference between each reference library and vitkit after import (and of the ONNX export),
at real model sizes with random weights: `python benchmarks/pretrained_parity.py [--small]`.

Not part of the test suite (the tests do the same at small sizes); this prints the figures the README quotes.
"""
import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from vitkit.io import export, load_pretrained  # noqa: E402


def diff(a, b):
    return (a - b).abs().max().item()


def run(d: Path, small: bool):
    import timm
    import transformers
    from safetensors.torch import save_file
    from torchvision.models import vit_b_16

    rows = []
    name = "vit_tiny_patch16_224" if small else "vit_base_patch16_224"
    B, size = 2, 224
    x = torch.randn(B, 3, size, size)

    def row(what, ref_out, ours_out, t0):
        rows.append((what, diff(ref_out, ours_out), time.time() - t0))
        print(f"{what:<62}{rows[-1][1]:>10.2e}{rows[-1][2]:>8.1f}s", flush=True)

    with torch.no_grad():
        t0 = time.time()
        ref = timm.create_model(name, pretrained=False).eval()
        torch.save(ref.state_dict(), d / "t.pth")
        save_file({k: v.contiguous() for k, v in ref.state_dict().items()}, str(d / "t.safetensors"))
        row(f"timm {name} .pth", ref(x), load_pretrained(d / "t.pth")(x), t0)
        t0 = time.time()
        row(f"timm {name} .safetensors", ref(x), load_pretrained(d / "t.safetensors")(x), t0)
        t0 = time.time()
        theirs = timm.create_model(name, pretrained=True, img_size=288, pretrained_cfg_overlay=dict(
            file=str(d / "t.pth"))).eval()
        x288 = torch.randn(1, 3, 288, 288)
        row(f"timm {name} resampled to 288 (vs timm's resampling)", theirs(x288),
            load_pretrained(d / "t.pth", img_size=288)(x288), t0)
        del theirs

        t0 = time.time()
        deit = timm.create_model("deit_small_distilled_patch16_224", pretrained=False).eval()
        torch.save({"model": deit.state_dict()}, d / "deit.pth")
        row("DeiT-S distilled {'model': ...}", deit(x), load_pretrained(d / "deit.pth")(x), t0)
        del deit

        t0 = time.time()
        mae = timm.create_model(name, pretrained=False, global_pool="avg").eval()
        torch.save({"model": mae.state_dict()}, d / "mae.pth")
        row(f"MAE-style fine-tuned {name} (avg pool, fc_norm)", mae(x), load_pretrained(d / "mae.pth")(x), t0)
        del mae

        t0 = time.time()
        D, L, H = (192, 12, 3) if small else (768, 12, 12)
        cfg = transformers.ViTConfig(hidden_size=D, num_hidden_layers=L, num_attention_heads=H,
                                     intermediate_size=4 * D, num_labels=1000)
        hf = transformers.ViTForImageClassification(cfg).eval()
        hf.save_pretrained(d / "hf")
        row(f"HF ViTForImageClassification D={D} (eps 1e-12)", hf(pixel_values=x).logits,
            load_pretrained(d / "hf")(x), t0)
        del hf

        t0 = time.time()
        tv = vit_b_16(weights=None).eval()
        torch.save(tv.state_dict(), d / "tv.pth")
        row("torchvision vit_b_16", tv(x), load_pretrained(d / "tv.pth")(x), t0)
        del tv

        t0 = time.time()
        ours = load_pretrained(d / "t.pth")
        export(ours, d / "t.npz", "npz")
        jax = timm.create_model(name, pretrained=False).eval()
        timm.models.vision_transformer._load_weights(jax, str(d / "t.npz"))
        row(f"npz (vitkit writes) -> timm _load_weights {name}", jax(x), ours(x), t0)
        t0 = time.time()
        row(f"npz -> vitkit import {name}", ref(x), load_pretrained(d / "t.npz")(x), t0)

    t0 = time.time()
    info = export(ours, d / "t.onnx", "onnx")
    rows.append((f"ONNX {name} via onnxruntime (batch 3)", info["max_abs_diff"], time.time() - t0))
    print(f"{rows[-1][0]:<62}{rows[-1][1]:>10.2e}{rows[-1][2]:>8.1f}s")
    return rows


if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("--small", action="store_true", help="ViT-Ti instead of ViT-B where there is a choice")
    args = ap.parse_args()
    torch.manual_seed(0)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; max abs logit difference, fp32")
    print(f"{'checkpoint':<62}{'max|Δ|':>10}{'time':>9}")
    with tempfile.TemporaryDirectory() as tmp:
        rows = run(Path(tmp), args.small)
    worst = max(r[1] for r in rows[:-1])
    print(f"worst import difference {worst:.2e} (bound 1e-5); ONNX {rows[-1][1]:.2e} (bound 1e-4)")
    sys.exit(0 if worst <= 1e-5 and rows[-1][1] <= 1e-4 else 1)
