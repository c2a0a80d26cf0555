"""Training throughput, vitkit vs timm: the same architecture with the same weights, one training step
(forward, cross-entropy, backward, AdamW) at a time, interleaved in one process so both see the same machine
load; medians over the steps; the vitkit/timm ratio is the last line (> 1: vitkit is faster).

    python benchmarks/train_speed.py            # vit_tiny_patch16_224 at batch 64, and the demo model at 128
    python benchmarks/train_speed.py --quick    # small batches, few steps (the test suite runs this)
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time

import torch
import torch.nn.functional as F


def timm_twin(model):
    """timm's VisionTransformer with our model's architecture and weights."""
    from timm.models.vision_transformer import VisionTransformer as TimmViT

    c = model.config
    ref = TimmViT(img_size=c.img_size, patch_size=c.patch_size, in_chans=c.in_chans, num_classes=c.num_classes,
                  global_pool=c.global_pool, embed_dim=c.embed_dim, depth=c.depth, num_heads=c.num_heads,
                  mlp_ratio=c.mlp_ratio, qkv_bias=c.qkv_bias, class_token=c.class_token)
    ref.load_state_dict(model.state_dict(), strict=True)
    return ref


def step_timer(model, x, y):
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, foreach=True)

    def step() -> float:
        t = time.perf_counter()
        loss = F.cross_entropy(model(x), y)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return time.perf_counter() - t

    return step


def compare(name: str, batch: int, steps: int, warmup: int = 2, **overrides) -> float:
    import vitkit

    torch.manual_seed(0)
    ours = vitkit.create_model(name, **overrides).train()
    ref = timm_twin(ours).train()
    c = ours.config
    x = torch.randn(batch, c.in_chans, c.img_size, c.img_size)
    y = torch.randint(0, c.num_classes, (batch,))
    with torch.no_grad():
        assert torch.allclose(ours(x), ref(x), atol=1e-4), "the two models must compute the same function"
    runs = {"vitkit": step_timer(ours, x, y), "timm": step_timer(ref, x, y)}
    times = {k: [] for k in runs}
    for i in range(warmup + steps):
        order = list(runs) if i % 2 == 0 else list(reversed(runs))  # alternate who goes first
        for k in order:
            t = runs[k]()
            if i >= warmup:
                times[k].append(t)
    ips = {k: batch / statistics.median(v) for k, v in times.items()}
    print(f"{name:<24} batch {batch:>3}  vitkit {ips['vitkit']:8.1f} img/s   timm {ips['timm']:8.1f} img/s   "
          f"ratio {ips['vitkit'] / ips['timm']:.3f}  ({steps} steps each, medians)", flush=True)
    return ips["vitkit"] / ips["timm"]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="small batches and few steps (seconds)")
    ap.add_argument("--steps", type=int, default=None)
    args = ap.parse_args(argv)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, training img/s (fwd+bwd+AdamW)")
    if args.quick:
        cases = [("vit_mini_patch7_28", 32, args.steps or 6, {"global_pool": "avg"}),
                 ("vit_tiny_patch16_224", 4, args.steps or 3, {})]
    else:
        cases = [("vit_mini_patch7_28", 128, args.steps or 20, {"global_pool": "avg"}),
                 ("vit_tiny_patch16_224", 64, args.steps or 8, {})]
    ratios = [compare(n, b, s, **o) for n, b, s, o in cases]
    geo = 1.0
    for r in ratios:
        geo *= r
    geo **= 1 / len(ratios)
    print(f"ratio vitkit/timm (geometric mean over {len(ratios)} models): {geo:.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
