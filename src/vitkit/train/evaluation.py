"""The held-out pass every task evaluates with: the dataset in order, in eval mode, the model's train/eval mode
restored afterwards. Tasks say what to measure per batch; the loop is this one."""
from __future__ import annotations

from typing import Callable, Iterator, Tuple

import torch

from ..data import make_loader


def eval_batches(model, dataset, batch_size: int, device=None, rank: int = 0,
                 world: int = 1) -> Iterator[Tuple[torch.Tensor, torch.Tensor]]:
    """(x, y) batches of `dataset` in order on `device` (default: the model's), with `model` in eval mode while
    they are consumed; its mode is restored when the loop ends or stops. Run it under `torch.no_grad()`.
    `rank`/`world`: this process's contiguous slice of each global batch (distributed evaluation)."""
    device = device or next(model.parameters()).device
    was = model.training
    model.eval()
    try:
        for x, y in make_loader(dataset, batch_size, train=False, rank=rank, world=world):
            yield x.to(device), y.to(device)
    finally:
        model.train(was)


@torch.no_grad()
def mean_over_batches(model, dataset, batch_fn: Callable, batch_size: int, device=None) -> float:
    """The per-image mean of `batch_fn(x, y)` (a batch mean, weighted by batch size) over `dataset`."""
    total, n = 0.0, 0
    for x, y in eval_batches(model, dataset, batch_size, device):
        total += float(batch_fn(x, y)) * len(y)
        n += len(y)
    return total / max(1, n)


__all__ = ["eval_batches", "mean_over_batches"]
