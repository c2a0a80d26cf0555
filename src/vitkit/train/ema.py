"""The exponential moving average of a model's weights, which the engine evaluates and saves when it is on."""
from __future__ import annotations

import copy

import torch
from torch import nn


class EMA:
    """Exponential moving average of the weights; the decay warms up as min(decay, (1 + n) / (10 + n))."""

    def __init__(self, model: nn.Module, decay: float):
        self.module = copy.deepcopy(model).eval()
        for p in self.module.parameters():
            p.requires_grad_(False)
        self.decay, self.updates = decay, 0

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        self.updates += 1
        d = min(self.decay, (1 + self.updates) / (10 + self.updates))
        ema = [v for v in self.module.state_dict().values() if v.dtype.is_floating_point]
        cur = [v for v in model.state_dict().values() if v.dtype.is_floating_point]
        torch._foreach_lerp_(ema, cur, 1.0 - d)

    def state_dict(self) -> dict:
        return {"weights": self.module.state_dict(), "updates": self.updates}

    def load_state_dict(self, s: dict) -> None:
        self.module.load_state_dict(s["weights"])
        self.updates = int(s["updates"])
