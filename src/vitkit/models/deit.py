"""DeiT's distilled ViT (Touvron et al. 2021, arXiv 2012.12877): a second prefix token learns from a teacher and has
its own head; at inference the two heads' logits are averaged.

The distillation token is the model's one register token (`reg_tokens=1`, position-embedded like the class token),
so everything else — blocks, resampling, features, token merging — is the plain `VisionTransformer`. Converters
map timm's `dist_token` to `reg_token`; `head_dist` keeps its name.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn as nn

from ..errors import ConfigError
from .config import ViTConfig
from .vit import VisionTransformer


class VisionTransformerDistilled(VisionTransformer):
    """ViT with a distillation token (its register token) and a distillation head; logits = mean of both heads."""

    def __init__(self, config: Optional[ViTConfig] = None, **kwargs):
        super().__init__(config, **kwargs)
        if self.config.reg_tokens != 1 or self.global_pool != "token":
            raise ConfigError("a distilled ViT has exactly one distillation token (reg_tokens=1) and token pooling; "
                              f"got reg_tokens={self.config.reg_tokens}, global_pool={self.global_pool!r}")
        d = self.embed_dim
        self.head_dist = nn.Linear(d, self.num_classes) if self.num_classes > 0 else nn.Identity()

    def reset_classifier(self, num_classes: int, global_pool: Optional[str] = None) -> None:
        if global_pool not in (None, "token"):
            raise ConfigError("a distilled ViT pools its class and distillation tokens: global_pool must be 'token'")
        super().reset_classifier(num_classes)
        w = self.pos_embed
        self.head_dist = nn.Linear(self.embed_dim, num_classes).to(w.device, w.dtype) if num_classes > 0 \
            else nn.Identity()
        if num_classes > 0:
            nn.init.zeros_(self.head_dist.bias)
            nn.init.trunc_normal_(self.head_dist.weight, std=0.02)

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False,
                     size: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Tokens (B, N, D) → (head(class token) + head_dist(distillation token)) / 2, as timm's DeiT at inference.
        `size` (token merging) changes nothing here: the two prefix tokens are never merged."""
        cls, dist = x[:, 0], x[:, 1]
        if pre_logits:
            return (cls + dist) / 2
        return (self.head(self.head_drop(cls)) + self.head_dist(self.head_drop(dist))) / 2


__all__ = ["VisionTransformerDistilled"]
