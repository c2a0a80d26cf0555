"""Fixtures for the task tests: a small ViT trained on real digits (mnist5k) in seconds."""
import pytest
import torch
import torch.nn.functional as F

import vitkit

from ._digits import mnist5k


@pytest.fixture(scope="session")
def digits_model(tmp_path_factory):
    """A 3-block ViT (patch 7, 16 tokens) trained for 300 steps on mnist5k's train split: a real, if small,
    classifier (~90% test accuracy), saved as a vitkit checkpoint. About 10 s on 2 cores."""
    torch.manual_seed(0)
    (x, y), _ = mnist5k()
    x = (x - 0.5) / 0.5
    model = vitkit.create_model("vit_mini_patch7_28", embed_dim=64, depth=3, num_heads=4, mlp_ratio=2.0)
    opt = torch.optim.AdamW(model.parameters(), lr=2e-3, weight_decay=0.05)
    steps = 300
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=2e-3, total_steps=steps, pct_start=0.1)
    g = torch.Generator().manual_seed(0)
    model.train()
    for _ in range(steps):
        idx = torch.randint(0, len(x), (64,), generator=g)
        loss = F.cross_entropy(model(x[idx]), y[idx])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
    model.eval()
    path = tmp_path_factory.mktemp("model") / "digits.safetensors"
    vitkit.save(model, path, class_names=[str(i) for i in range(10)])
    return path
