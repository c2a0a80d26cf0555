"""Measure, don't assume: how long a training step of a model takes on this machine, and whether a cheaper
precision trains as well as fp32. The time-budget planners use these before the first real step.

    sec = step_seconds(model, (128, 3, 32, 32), 10, precision="bf16")     # median of a few real steps
    ok, info = precision_agrees(make_model, batches, held_out, "bf16")     # held-out loss after k steps each
"""
from __future__ import annotations

import copy
import time
from contextlib import nullcontext
from typing import Callable, Dict, Iterable, List, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from .optim import build_optimizer


def autocast(precision: str, device: torch.device):
    """The autocast context of a precision name: fp32 → none, bf16/fp16 → torch.autocast on the device."""
    if precision == "fp32":
        return nullcontext()
    return torch.autocast(device.type, dtype=torch.bfloat16 if precision == "bf16" else torch.float16)


def step_seconds(model: nn.Module, input_shape: Sequence[int], num_classes: int, *, precision: str = "fp32",
                 steps: int = 3, warmup: int = 1, device=None, clock=time.perf_counter,
                 compile: bool = False) -> float:
    """Median seconds of one optimizer step (forward, cross-entropy, backward, AdamW) on random data of
    `input_shape`, after `warmup` unmeasured steps (with `compile`, the first one compiles). The model is a copy:
    the caller's weights are untouched."""
    device = torch.device(device or "cpu")
    net = copy.deepcopy(model).to(device).train()
    opt = build_optimizer(net, 1e-4, 0.05)
    if compile:
        net = torch.compile(net)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(*input_shape, generator=g).to(device)
    y = torch.randint(0, max(1, num_classes), (input_shape[0],), generator=g).to(device)
    times: List[float] = []
    for i in range(warmup + steps):
        t = clock()
        with autocast(precision, device):
            out = net(x)
        F.cross_entropy(out.float(), y).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        if i >= warmup:
            times.append(clock() - t)
    times.sort()
    return times[len(times) // 2]


@torch.no_grad()
def _held_out_loss(model: nn.Module, held_out: Sequence[Tuple[torch.Tensor, torch.Tensor]]) -> float:
    model.eval()
    total, n = 0.0, 0
    for x, y in held_out:  # evaluated in fp32 whatever the training precision: the comparison is of the weights
        total += F.cross_entropy(model(x).float(), y, reduction="sum").item()
        n += len(y)
    model.train()
    return total / max(1, n)


def precision_agrees(make_model: Callable[[], nn.Module], batches: Iterable[Tuple[torch.Tensor, torch.Tensor]],
                     held_out: Sequence[Tuple[torch.Tensor, torch.Tensor]], precision: str, *, lr: float = 1e-3,
                     tolerance: float = 0.25, device=None) -> Tuple[bool, Dict[str, float]]:
    """Train two copies of the same initial model on the same batches, one in fp32 and one in `precision`, and
    compare their held-out loss: `precision` agrees when it gets at least (1 - tolerance) of fp32's improvement
    of the held-out loss and lands within `tolerance` of that improvement from fp32's loss. A run in which fp32
    itself does not improve the loss by 2% proves nothing and does not agree."""
    device = torch.device(device or "cpu")
    batches = list(batches)
    start = make_model().to(device)
    losses = {}
    before = _held_out_loss(start, held_out)
    for prec in ("fp32", precision):
        net = copy.deepcopy(start).train()
        opt = build_optimizer(net, lr, 0.05)
        for x, y in batches:
            with autocast(prec, device):
                out = net(x.to(device))
            loss = F.cross_entropy(out.float(), y.to(device))
            loss.backward()
            torch.nn.utils.clip_grad_norm_(net.parameters(), 1.0)
            opt.step()
            opt.zero_grad(set_to_none=True)
        losses[prec] = _held_out_loss(net, held_out)
    ref, other = losses["fp32"], losses[precision]
    gain = before - ref
    info = {"steps": len(batches), "loss_before": before, "loss_fp32": ref, f"loss_{precision}": other,
            "gap_of_gain": abs(other - ref) / max(gain, 1e-8), "tolerance": tolerance}
    return bool(gain > 0.02 * before and abs(other - ref) <= tolerance * gain), info
