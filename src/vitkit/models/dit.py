"""Diffusion Transformer of Peebles & Xie 2023, "Scalable Diffusion Models with Transformers" (arXiv 2212.09748).

A noisy image (B, C, H, W) is patchified into tokens with fixed 2-D sin-cos positions; the timestep (sinusoidal
features → MLP) and the class (an embedding table with one extra row, the "null" class of classifier-free guidance)
are summed into a conditioning vector c. Each block is a ViT block whose LayerNorms carry no parameters: an MLP of c
regresses a shift, a scale and a gate for each of the two branches (adaLN-Zero, the gates start at zero so every
block starts as the identity). A final adaLN layer maps tokens back to patches. Pixel space (no latent autoencoder).

Parameter names follow facebookresearch/DiT `models.py`: `x_embedder.proj`, `pos_embed`, `t_embedder.mlp.{0,2}`,
`y_embedder.embedding_table [C+1, D]`, `blocks.N.{attn.qkv, attn.proj, mlp.fc1, mlp.fc2, adaLN_modulation.1}`,
`final_layer.{linear, adaLN_modulation.1}`. The attention and MLP are the ViT's own (`vit.Attention`, `vit.Mlp`).
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn as nn

from ..errors import ConfigError
from .config import replace_checked
from .patches import patchify, sincos_pos_embed_2d, unpatchify
from .vit import Attention, Mlp, PatchEmbed

OBJECTIVES = ("flow", "ddpm")


@dataclass(frozen=True)
class DiTConfig:
    """A DiT's architecture and what its output means (`objective`), so a checkpoint samples itself."""

    img_size: int = 28
    patch_size: int = 4
    in_chans: int = 1
    embed_dim: int = 192  # DiT's `hidden_size`
    depth: int = 6
    num_heads: int = 6
    mlp_ratio: float = 4.0
    num_classes: int = 10  # the class table has one more row: the null class for classifier-free guidance
    class_dropout_prob: float = 0.1  # share of training labels replaced by the null class
    objective: str = "flow"  # 'flow': rectified flow, the model predicts the velocity; 'ddpm': it predicts the noise
    frequency_embedding_size: int = 256
    name: str = ""

    def replace(self, **changes) -> "DiTConfig":
        return replace_checked(self, changes, "DiT")

    def validate(self) -> None:
        from .. import validate as v

        for k in ("img_size", "patch_size", "in_chans", "embed_dim", "depth", "num_heads",
                  "frequency_embedding_size"):
            v.integer(getattr(self, k), k, lo=1)
        v.integer(self.num_classes, "num_classes")  # its range: below, with why
        v.number(self.mlp_ratio, "mlp_ratio", lo=0, lo_open=True)
        v.number(self.class_dropout_prob, "class_dropout_prob", lo=0, hi=1, hi_open=True)
        if self.embed_dim % self.num_heads:
            raise ConfigError(f"embed_dim {self.embed_dim} must be divisible by num_heads {self.num_heads}")
        if self.embed_dim % 4:
            raise ConfigError(f"embed_dim {self.embed_dim} must be divisible by 4 (2-D sin-cos positions)")
        if self.img_size % self.patch_size:
            raise ConfigError(f"img_size {self.img_size} must be a multiple of patch_size {self.patch_size}")
        if self.objective not in OBJECTIVES:
            raise ConfigError(f"objective must be one of {OBJECTIVES}, got {self.objective!r}")
        if self.num_classes < 1:
            raise ConfigError("a class-conditional DiT needs num_classes >= 1")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "DiTConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in known})

    @property
    def grid_size(self):
        return self.img_size // self.patch_size, self.img_size // self.patch_size


def modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """Tokens (B, N, D) shifted and scaled per image by (B, D) vectors: x * (1 + scale) + shift."""
    return x * (1 + scale.unsqueeze(1)) + shift.unsqueeze(1)


def timestep_embedding(t: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """Timesteps (B,) (may be fractional) → sinusoidal features (B, dim): [cos(t·f), sin(t·f)], f geometric."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    args = t[:, None].float() * freqs[None]
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    if dim % 2:
        emb = torch.cat([emb, torch.zeros_like(emb[:, :1])], dim=-1)
    return emb


class TimestepEmbedder(nn.Module):
    """Scalar timesteps (B,) → vectors (B, D) through sinusoidal features and a two-layer SiLU MLP."""

    def __init__(self, hidden_size: int, frequency_embedding_size: int = 256):
        super().__init__()
        self.frequency_embedding_size = frequency_embedding_size
        self.mlp = nn.Sequential(nn.Linear(frequency_embedding_size, hidden_size), nn.SiLU(),
                                 nn.Linear(hidden_size, hidden_size))

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        return self.mlp(timestep_embedding(t, self.frequency_embedding_size))


class LabelEmbedder(nn.Module):
    """Class labels (B,) → vectors (B, D). Row `num_classes` is the null class; while training a share
    `dropout_prob` of the labels is replaced by it, so the same model also learns the unconditional distribution."""

    def __init__(self, num_classes: int, hidden_size: int, dropout_prob: float):
        super().__init__()
        self.num_classes = num_classes
        self.dropout_prob = dropout_prob
        self.embedding_table = nn.Embedding(num_classes + 1, hidden_size)

    def token_drop(self, labels: torch.Tensor, generator: Optional[torch.Generator] = None) -> torch.Tensor:
        drop = torch.rand(labels.shape[0], device=labels.device, generator=generator) < self.dropout_prob
        return torch.where(drop, torch.full_like(labels, self.num_classes), labels)

    def forward(self, labels: torch.Tensor, generator: Optional[torch.Generator] = None) -> torch.Tensor:
        if self.training and self.dropout_prob > 0:
            labels = self.token_drop(labels, generator)
        return self.embedding_table(labels)


class DiTBlock(nn.Module):
    """x + gate_a · Attn(modulate(LN(x))), then x + gate_m · MLP(modulate(LN(x))); shifts, scales, gates from c."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float = 4.0):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.attn = Attention(dim, num_heads, qkv_bias=True)
        self.norm2 = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.mlp = Mlp(dim, int(dim * mlp_ratio), act_layer=lambda: nn.GELU(approximate="tanh"))
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(dim, 6 * dim))

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = self.adaLN_modulation(c).chunk(6, dim=1)
        x = x + gate_msa.unsqueeze(1) * self.attn(modulate(self.norm1(x), shift_msa, scale_msa))
        x = x + gate_mlp.unsqueeze(1) * self.mlp(modulate(self.norm2(x), shift_mlp, scale_mlp))
        return x


class FinalLayer(nn.Module):
    """Tokens (B, N, D) → patch values (B, N, p*p*C) after an adaLN (shift and scale from c)."""

    def __init__(self, dim: int, patch_size: int, out_channels: int):
        super().__init__()
        self.norm_final = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.linear = nn.Linear(dim, patch_size * patch_size * out_channels)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(dim, 2 * dim))

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        shift, scale = self.adaLN_modulation(c).chunk(2, dim=1)
        return self.linear(modulate(self.norm_final(x), shift, scale))


class DiT(nn.Module):
    """Class-conditional diffusion transformer. `forward(x, t, y)`: noisy images (B, C, H, W), timesteps (B,) on
    the 0..1000 scale, labels (B,) (`num_classes` = null) → the prediction (B, C, H, W) the objective asks for."""

    def __init__(self, config: Optional[DiTConfig] = None, **kwargs):
        super().__init__()
        cfg = config if config is not None else DiTConfig()
        if kwargs:
            cfg = cfg.replace(**kwargs)
        cfg.validate()
        self.config = cfg
        D = cfg.embed_dim
        self.num_classes = cfg.num_classes
        self.in_chans = self.out_chans = cfg.in_chans
        self.patch_size = cfg.patch_size
        self.x_embedder = PatchEmbed(cfg.img_size, cfg.patch_size, cfg.in_chans, D)
        self.t_embedder = TimestepEmbedder(D, cfg.frequency_embedding_size)
        self.y_embedder = LabelEmbedder(cfg.num_classes, D, cfg.class_dropout_prob)
        # Fixed sin-cos positions, a frozen parameter as in DiT's checkpoints.
        self.pos_embed = nn.Parameter(torch.zeros(1, self.x_embedder.num_patches, D), requires_grad=False)
        self.blocks = nn.ModuleList([DiTBlock(D, cfg.num_heads, cfg.mlp_ratio) for _ in range(cfg.depth)])
        self.final_layer = FinalLayer(D, cfg.patch_size, self.out_chans)
        self.initialize_weights()

    def initialize_weights(self) -> None:
        """DiT's initialisation: xavier linears, normal(0.02) class table and timestep MLP, and zeros for every
        adaLN modulation and the output layer (adaLN-Zero: the network starts as the identity on each block)."""
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
        with torch.no_grad():
            self.pos_embed.copy_(sincos_pos_embed_2d(self.config.embed_dim, self.x_embedder.grid_size)[None])
        w = self.x_embedder.proj.weight
        nn.init.xavier_uniform_(w.view(w.shape[0], -1))
        nn.init.zeros_(self.x_embedder.proj.bias)
        nn.init.normal_(self.y_embedder.embedding_table.weight, std=0.02)
        nn.init.normal_(self.t_embedder.mlp[0].weight, std=0.02)
        nn.init.normal_(self.t_embedder.mlp[2].weight, std=0.02)
        for blk in self.blocks:
            nn.init.zeros_(blk.adaLN_modulation[-1].weight)
            nn.init.zeros_(blk.adaLN_modulation[-1].bias)
        for lin in (self.final_layer.adaLN_modulation[-1], self.final_layer.linear):
            nn.init.zeros_(lin.weight)
            nn.init.zeros_(lin.bias)

    @torch.jit.ignore
    def no_weight_decay(self) -> set:
        return {"pos_embed"}

    def unpatchify(self, x: torch.Tensor) -> torch.Tensor:
        return unpatchify(x, self.patch_size, self.x_embedder.grid_size, self.out_chans)

    def patchify(self, imgs: torch.Tensor) -> torch.Tensor:
        return patchify(imgs, self.patch_size)

    def check_labels(self, y: torch.Tensor) -> None:
        bad = y[(y < 0) | (y > self.num_classes)]
        if bad.numel():
            raise ConfigError(f"class {int(bad[0])} is out of range: this DiT knows classes 0..{self.num_classes - 1} "
                              f"(and {self.num_classes} = unconditional)")

    def forward(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor,
                generator: Optional[torch.Generator] = None) -> torch.Tensor:
        B = x.shape[0]
        tok = self.x_embedder(x)
        tok = tok.reshape(B, -1, tok.shape[-1]) + self.pos_embed
        if t.ndim == 0:
            t = t.expand(B)
        c = self.t_embedder(t) + self.y_embedder(y, generator)
        for blk in self.blocks:
            tok = blk(tok, c)
        return self.unpatchify(self.final_layer(tok, c))

    def forward_with_cfg(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor, cfg_scale: float) -> torch.Tensor:
        """Classifier-free guidance: u + s·(c − u) from one batched pass over the conditional and null labels.
        At s = 1 this is the conditional prediction itself (no second pass)."""
        if cfg_scale == 1.0:
            return self.forward(x, t, y)
        null = torch.full_like(y, self.num_classes)
        t2 = t.expand(x.shape[0]) if t.ndim == 0 else t
        out = self.forward(torch.cat([x, x]), torch.cat([t2, t2]), torch.cat([y, null]))
        cond, uncond = out.chunk(2)
        return uncond + cfg_scale * (cond - uncond)


__all__ = ["DiTConfig", "DiT", "DiTBlock", "FinalLayer", "TimestepEmbedder", "LabelEmbedder", "modulate",
           "timestep_embedding", "OBJECTIVES"]
