"""Shared test set-up: deterministic seeds, no network, the CPU as the device of every `auto` (subprocesses
inherit it), CI's rule that a missing dependency fails rather than skips (require_deps.py), and the small ViT
trained on real digits (mnist5k, about 20 seconds) that the task and serve tests share, trained once per session."""
import os
import random

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from require_deps import pytest_make_collect_report, pytest_runtest_makereport  # noqa: F401 (hooks)

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
# vitkit.train.resolve_device("auto") → the CPU even on a GPU host: the bit-identical resume check holds on the
# CPU, and a single-GPU host's DDP rank 1 would ask for cuda:1. GPU tests name their device.
os.environ.setdefault("VITKIT_DEVICE", "cpu")


@pytest.fixture(autouse=True)
def _seed():
    random.seed(0)
    np.random.seed(0)
    torch.manual_seed(0)
    yield


def _augment(b: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    """Random crops (24-28 px, resized back to 28) and brightness changes of (B, 1, 28, 28) digits in [-1, 1]."""
    n = b.shape[0]
    sizes = torch.randint(24, 29, (n,), generator=g)
    out = torch.empty_like(b)
    for i in range(n):
        k = int(sizes[i])
        y0, x0 = torch.randint(0, 29 - k, (2,), generator=g)
        out[i] = F.interpolate(b[i: i + 1, :, y0: y0 + k, x0: x0 + k], size=28, mode="bilinear",
                               align_corners=False)[0]
    scale = 0.7 + 0.6 * torch.rand(n, 1, 1, 1, generator=g)
    return ((out + 1) * scale - 1).clamp(-1, 1)


@pytest.fixture(scope="session")
def digits_model(tmp_path_factory):
    """A 3-block ViT (patch 7, 16 tokens, width 64) trained for 300 steps on vitkit's mnist5k training split only,
    saved as a vitkit checkpoint: ~88% on the held-out 1,000, which the tests query with and it never saw.
    Besides cross-entropy it learns SimCLR's NT-Xent on the class token between two augmented views (crops,
    brightness) of each digit, so its embedding tells near-duplicates of an image from other digits of the same
    class, as a retrieval model should. One thread: on a loaded 2-core machine, two threads spin against each
    other (20x slower measured)."""
    import vitkit
    from tasks._digits import mnist5k

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        torch.manual_seed(0)
        (x, y), _ = mnist5k()
        x = (x - 0.5) / 0.5
        model = vitkit.create_model("vit_mini_patch7_28", embed_dim=64, depth=3, num_heads=4, mlp_ratio=2.0)
        steps, batch = 300, 64
        opt = torch.optim.AdamW(model.parameters(), lr=2e-3, weight_decay=0.05)
        sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=2e-3, total_steps=steps, pct_start=0.1)
        g = torch.Generator().manual_seed(0)
        pairs = torch.cat([torch.arange(batch, 2 * batch), torch.arange(batch)])
        model.train()
        for _ in range(steps):
            idx = torch.randint(0, len(x), (batch,), generator=g)
            tokens = model.forward_features(torch.cat([_augment(x[idx], g), _augment(x[idx], g)]))
            z = F.normalize(tokens[:, 0], dim=1)
            sim = (z @ z.T / 0.1).fill_diagonal_(-1e9)
            loss = F.cross_entropy(model.forward_head(tokens), y[idx].repeat(2)) + F.cross_entropy(sim, pairs)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
        model.eval()
    finally:
        torch.set_num_threads(threads)
    path = tmp_path_factory.mktemp("model") / "digits.safetensors"
    vitkit.save(model, path, class_names=[str(i) for i in range(10)])
    return path
