"""The two generative objectives a DiT trains with, each with its deterministic sampler.

- `flow` (rectified flow / flow matching, Liu et al. 2022; Lipman et al. 2022): x_t = (1 − t)·x0 + t·ε on a straight
  line from the data (t = 0) to noise (t = 1); the model regresses the velocity v = ε − x0; sampling integrates
  dx/dt = v from t = 1 to 0 with Euler steps.
- `ddpm` (Ho et al. 2020): x_t = √ᾱ_t·x0 + √(1 − ᾱ_t)·ε with the linear β schedule 1e-4..0.02 over 1,000 steps; the
  model predicts ε; sampling is DDIM with η = 0 (Song et al. 2020), deterministic, on an evenly spaced subset of steps.

Both feed the DiT timesteps on the 0..1000 scale (flow's t is multiplied by 1,000), so one model class serves both.
Data are images scaled to [-1, 1]. Sampling is a pure function of the initial noise: seed it for reproducibility.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..errors import ConfigError

NUM_TIMESTEPS = 1000


def _predict(model: nn.Module, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor, cfg_scale: float) -> torch.Tensor:
    return model.forward_with_cfg(x, t, y, cfg_scale)


class RectifiedFlow:
    """Straight-line flow matching: velocity regression, Euler sampling."""

    name = "flow"

    def loss(self, model: nn.Module, x0: torch.Tensor, y: torch.Tensor,
             generator: Optional[torch.Generator] = None) -> torch.Tensor:
        B = x0.shape[0]
        t = torch.rand(B, device=x0.device, generator=generator)
        noise = torch.randn(x0.shape, device=x0.device, generator=generator)
        tb = t.view(B, 1, 1, 1)
        xt = (1 - tb) * x0 + tb * noise
        v = model(xt, t * NUM_TIMESTEPS, y, generator=generator)
        return F.mse_loss(v, noise - x0)

    @torch.no_grad()
    def sample(self, model: nn.Module, noise: torch.Tensor, y: torch.Tensor, steps: int = 50,
               cfg_scale: float = 1.0) -> torch.Tensor:
        """Noise (B, C, H, W) at t = 1 → samples at t = 0, with `steps` Euler steps on a uniform grid."""
        ts = torch.linspace(1.0, 0.0, steps + 1, device=noise.device)
        x = noise
        for i in range(steps):
            v = _predict(model, x, ts[i].expand(x.shape[0]) * NUM_TIMESTEPS, y, cfg_scale)
            x = x + (ts[i + 1] - ts[i]) * v
        return x


class DDPM:
    """ε-prediction with the linear β schedule; DDIM (η = 0) sampling."""

    name = "ddpm"

    def __init__(self, beta_start: float = 1e-4, beta_end: float = 0.02, num_timesteps: int = NUM_TIMESTEPS):
        betas = torch.linspace(beta_start, beta_end, num_timesteps, dtype=torch.float64)
        self.alphas_cumprod = torch.cumprod(1.0 - betas, dim=0)
        self.num_timesteps = num_timesteps

    def _abar(self, t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        return self.alphas_cumprod.to(like.device)[t].to(like.dtype).view(-1, 1, 1, 1)

    def loss(self, model: nn.Module, x0: torch.Tensor, y: torch.Tensor,
             generator: Optional[torch.Generator] = None) -> torch.Tensor:
        B = x0.shape[0]
        t = torch.randint(0, self.num_timesteps, (B,), device=x0.device, generator=generator)
        noise = torch.randn(x0.shape, device=x0.device, generator=generator)
        ab = self._abar(t, x0)
        xt = ab.sqrt() * x0 + (1 - ab).sqrt() * noise
        eps = model(xt, t.to(x0.dtype), y, generator=generator)
        return F.mse_loss(eps, noise)

    @torch.no_grad()
    def sample(self, model: nn.Module, noise: torch.Tensor, y: torch.Tensor, steps: int = 50,
               cfg_scale: float = 1.0) -> torch.Tensor:
        """Noise (B, C, H, W) → samples by DDIM with `steps` evenly spaced timesteps from T−1 down to 0."""
        ts = torch.linspace(self.num_timesteps - 1, 0, steps, device=noise.device).round().long()
        x = noise
        for i, t in enumerate(ts):
            ab = self._abar(t.view(1), x)
            ab_prev = self._abar(ts[i + 1].view(1), x) if i + 1 < len(ts) else torch.ones_like(ab)
            eps = _predict(model, x, t.to(x.dtype).expand(x.shape[0]), y, cfg_scale)
            x0 = ((x - (1 - ab).sqrt() * eps) / ab.sqrt()).clamp(-1, 1)
            eps = (x - ab.sqrt() * x0) / (1 - ab).sqrt()  # consistent with the clipped x0
            x = ab_prev.sqrt() * x0 + (1 - ab_prev).sqrt() * eps
        return x


def get_objective(name: str):
    """'flow' → RectifiedFlow(), 'ddpm' → DDPM()."""
    if name == "flow":
        return RectifiedFlow()
    if name == "ddpm":
        return DDPM()
    raise ConfigError(f"unknown objective {name!r}; choose 'flow' (rectified flow) or 'ddpm' (ε-prediction)")


__all__ = ["RectifiedFlow", "DDPM", "get_objective", "NUM_TIMESTEPS"]
