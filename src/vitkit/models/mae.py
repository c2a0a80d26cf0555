"""Masked autoencoder of He et al. 2022, "Masked Autoencoders Are Scalable Vision Learners" (arXiv 2111.06377).

Patchify → drop a random `mask_ratio` of the patch tokens per image → the encoder (a `VisionTransformer`'s patch
embedding, blocks and norm) encodes the visible ones → a light Transformer decoder (own width and depth) gets the
encoded tokens plus a shared mask token at every masked position → a linear layer predicts each patch's pixels;
the loss is the mean squared error on masked patches only, against per-patch normalised pixels with
`norm_pix_loss`. Position embeddings are fixed 2-D sin-cos (`patches.py`).

Parameter names follow facebookresearch/mae `models_mae.py`: the encoder keeps timm's names (`patch_embed.proj`,
`cls_token`, `pos_embed`, `blocks.N.*`, `norm`), the decoder adds `mask_token`, `decoder_embed`, `decoder_pos_embed`,
`decoder_blocks.N.*`, `decoder_norm`, `decoder_pred`. `to_encoder()` drops the decoder and gives a classifier.
An MAE is not a classifier: it is no `VisionTransformer`, so what needs one (`optimize`, `apply_tome`) refuses it.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn as nn

from ..errors import ConfigError
from .config import ViTConfig
from .patches import patchify, sincos_pos_embed_1d, sincos_pos_embed_2d, unpatchify
from .vit import Block, VisionTransformer


def random_masking(x: torch.Tensor, mask_ratio: float, noise: Optional[torch.Tensor] = None,
                   generator: Optional[torch.Generator] = None):
    """Keep a random subset of the tokens of each sequence (B, N, D), in their original values.

    Exactly round(N * mask_ratio) tokens are dropped per image. Returns the kept tokens (B, N_keep, D), the binary
    mask (B, N) with 1 = masked (removed), and `ids_restore` (B, N) that undoes the shuffle."""
    if not 0.0 <= mask_ratio < 1.0:
        raise ConfigError(f"mask_ratio must be in [0, 1), got {mask_ratio}")
    B, N, D = x.shape
    len_keep = N - int(round(N * mask_ratio))
    if noise is None:
        noise = torch.rand(B, N, device=x.device, generator=generator)
    ids_shuffle = torch.argsort(noise, dim=1)  # ascending: the smallest noise is kept
    ids_restore = torch.argsort(ids_shuffle, dim=1)
    ids_keep = ids_shuffle[:, :len_keep]
    x_kept = torch.gather(x, 1, ids_keep.unsqueeze(-1).expand(-1, -1, D))
    mask = torch.ones(B, N, device=x.device)
    mask[:, :len_keep] = 0
    mask = torch.gather(mask, 1, ids_restore)
    return x_kept, mask, ids_restore


@dataclass(frozen=True)
class MAEConfig(ViTConfig):
    """A ViT encoder (every `ViTConfig` field) plus MAE's decoder and masking. No classifier head while pretraining."""

    num_classes: int = 0
    decoder_embed_dim: int = 512
    decoder_depth: int = 8
    decoder_num_heads: int = 16
    decoder_mlp_ratio: float = 4.0
    mask_ratio: float = 0.75
    norm_pix_loss: bool = True  # targets are each patch's pixels normalised to mean 0, variance 1

    def validate(self) -> None:
        super().validate()
        if self.reg_tokens or self.no_embed_class or self.dynamic_img_pad:
            raise ConfigError("MAE supports the plain ViT layout only: reg_tokens=0, no_embed_class=False, "
                             "dynamic_img_pad=False")
        if self.decoder_embed_dim % self.decoder_num_heads:
            raise ConfigError(f"decoder_embed_dim {self.decoder_embed_dim} must be divisible by decoder_num_heads "
                             f"{self.decoder_num_heads}")
        if self.embed_dim % 4 or self.decoder_embed_dim % 4:
            raise ConfigError("MAE's 2-D sin-cos position embeddings need embed_dim and decoder_embed_dim divisible by 4")
        if not 0.0 <= self.mask_ratio < 1.0:
            raise ConfigError(f"mask_ratio must be in [0, 1), got {self.mask_ratio}")

    def encoder_config(self, **overrides) -> ViTConfig:
        """The plain `ViTConfig` of the encoder (what `to_encoder()` builds), with `overrides` applied."""
        return ViTConfig.from_dict(self.to_dict()).replace(**overrides)


def mae_config_for(encoder: ViTConfig, **decoder) -> MAEConfig:
    """An `MAEConfig` whose encoder is `encoder` (e.g. a registered ViT config) and whose decoder is `decoder`."""
    d = encoder.to_dict()
    d.update(num_classes=0)
    d.update(decoder)
    return MAEConfig.from_dict(d)


# the encoder's parts an MAE holds, under the names (and in the order) of a ViT's: the checkpoint layout
ENCODER_PARTS = ("patch_embed", "norm_pre", "blocks", "norm", "fc_norm", "head")


class MaskedAutoencoderViT(nn.Module):
    """MAE: a ViT encoder's parts (it sees only the visible patches while pretraining) and a decoder that predicts
    the pixels of every patch. `forward(imgs)` → (loss, pred (B, N, p*p*C), mask (B, N))."""

    def __init__(self, config: Optional[MAEConfig] = None, **kwargs):
        super().__init__()
        cfg = config if config is not None else MAEConfig()
        if not isinstance(cfg, MAEConfig):
            cfg = mae_config_for(cfg)
        if kwargs:
            cfg = cfg.replace(**kwargs)
        cfg.validate()
        self.config = cfg
        # The encoder is built, and initialised, as a ViT of the same config; the MAE takes over its parts.
        encoder = VisionTransformer(cfg.encoder_config())
        self.cls_token, self.pos_embed = encoder.cls_token, encoder.pos_embed
        for name in ENCODER_PARTS:
            setattr(self, name, getattr(encoder, name))
        self.num_prefix_tokens, self.embed_dim, self.num_classes = \
            encoder.num_prefix_tokens, encoder.embed_dim, encoder.num_classes
        p, C = cfg.patch_size, cfg.in_chans
        npt = self.num_prefix_tokens
        dd = cfg.decoder_embed_dim
        norm_layer = lambda d: nn.LayerNorm(d, eps=cfg.norm_eps)  # noqa: E731
        # Fixed sin-cos position embeddings, stored as frozen parameters so the checkpoint layout is MAE's.
        self.pos_embed.requires_grad_(False)
        self.decoder_embed = nn.Linear(cfg.embed_dim, dd)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, dd))
        self.decoder_pos_embed = nn.Parameter(torch.zeros(1, npt + self.patch_embed.num_patches, dd),
                                              requires_grad=False)
        self.decoder_blocks = nn.ModuleList([
            Block(dd, cfg.decoder_num_heads, cfg.decoder_mlp_ratio, qkv_bias=True, norm_layer=norm_layer)
            for _ in range(cfg.decoder_depth)
        ])
        self.decoder_norm = norm_layer(dd)
        self.decoder_pred = nn.Linear(dd, p * p * C)
        self._init_mae()

    def _init_mae(self) -> None:
        """MAE's initialisation: sin-cos position tables, xavier-uniform linears (the encoder's already are),
        class and mask tokens normal(0.02)."""
        grid = self.patch_embed.grid_size
        npt = self.num_prefix_tokens
        with torch.no_grad():
            self.pos_embed.copy_(sincos_pos_embed_2d(self.embed_dim, grid, npt)[None])
            self.decoder_pos_embed.copy_(sincos_pos_embed_2d(self.config.decoder_embed_dim, grid, npt)[None])
        if self.cls_token is not None:
            nn.init.normal_(self.cls_token, std=0.02)
        nn.init.normal_(self.mask_token, std=0.02)
        for m in [self.decoder_embed, self.decoder_pred, *self.decoder_blocks.modules()]:
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)

    @torch.jit.ignore
    def no_weight_decay(self) -> set:
        return {"pos_embed", "cls_token", "mask_token", "decoder_pos_embed"}

    # ---- pixels <-> patches --------------------------------------------------------------------------------
    def patchify(self, imgs: torch.Tensor) -> torch.Tensor:
        return patchify(imgs, self.config.patch_size)

    def unpatchify(self, x: torch.Tensor) -> torch.Tensor:
        return unpatchify(x, self.config.patch_size, self.patch_embed.grid_size, self.config.in_chans)

    # ---- the three stages ----------------------------------------------------------------------------------
    def forward_encoder(self, imgs: torch.Tensor, mask_ratio: Optional[float] = None,
                        noise: Optional[torch.Tensor] = None, generator: Optional[torch.Generator] = None):
        """Images (B, C, H, W) → encoded visible tokens (B, prefix + N_keep, D), mask (B, N), ids_restore (B, N)."""
        ratio = self.config.mask_ratio if mask_ratio is None else mask_ratio
        npt = self.num_prefix_tokens
        x = self.patch_embed(imgs)
        B, H, W, D = x.shape
        x = x.reshape(B, H * W, D) + self.pos_embed[:, npt:]
        x, mask, ids_restore = random_masking(x, ratio, noise=noise, generator=generator)
        if self.cls_token is not None:
            cls = self.cls_token + self.pos_embed[:, :1]
            x = torch.cat([cls.expand(B, -1, -1), x], dim=1)
        x = self.blocks(x)
        return self.norm(x), mask, ids_restore

    def forward_decoder(self, latent: torch.Tensor, ids_restore: torch.Tensor) -> torch.Tensor:
        """Encoded visible tokens + ids_restore → predicted pixels of every patch (B, N, p*p*C)."""
        npt = self.num_prefix_tokens
        x = self.decoder_embed(latent)
        B, n_vis, dd = x.shape
        N = ids_restore.shape[1]
        mask_tokens = self.mask_token.expand(B, N - (n_vis - npt), -1)
        x_ = torch.cat([x[:, npt:], mask_tokens], dim=1)
        x_ = torch.gather(x_, 1, ids_restore.unsqueeze(-1).expand(-1, -1, dd))  # back to the image's patch order
        x = torch.cat([x[:, :npt], x_], dim=1) + self.decoder_pos_embed
        for blk in self.decoder_blocks:
            x = blk(x)
        return self.decoder_pred(self.decoder_norm(x))[:, npt:]

    def targets(self, imgs: torch.Tensor) -> torch.Tensor:
        """The pixels the decoder should predict (B, N, p*p*C): per-patch normalised with `norm_pix_loss`."""
        target = self.patchify(imgs)
        if self.config.norm_pix_loss:
            mean = target.mean(dim=-1, keepdim=True)
            var = target.var(dim=-1, keepdim=True)
            target = (target - mean) / (var + 1.0e-6) ** 0.5
        return target

    def forward_loss(self, imgs: torch.Tensor, pred: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Mean squared error per patch, averaged over the masked patches only."""
        loss = ((pred - self.targets(imgs)) ** 2).mean(dim=-1)
        return (loss * mask).sum() / mask.sum().clamp(min=1)

    def forward(self, imgs: torch.Tensor, mask_ratio: Optional[float] = None, noise: Optional[torch.Tensor] = None,
                generator: Optional[torch.Generator] = None):
        latent, mask, ids_restore = self.forward_encoder(imgs, mask_ratio, noise=noise, generator=generator)
        pred = self.forward_decoder(latent, ids_restore)
        return self.forward_loss(imgs, pred, mask), pred, mask

    # ---- use the result ------------------------------------------------------------------------------------
    def reconstruct(self, imgs: torch.Tensor, mask_ratio: Optional[float] = None,
                    generator: Optional[torch.Generator] = None):
        """Images → (reconstruction (B, C, H, W), mask as an image (B, 1, H, W) with 1 = masked). With
        `norm_pix_loss` the prediction is put back into each patch's own pixel statistics (MAE's visualisation),
        which uses the true statistics of the masked patches: it shows the structure the model predicted."""
        _, pred, mask = self.forward(imgs, mask_ratio, generator=generator)
        if self.config.norm_pix_loss:
            target = self.patchify(imgs)
            mean = target.mean(dim=-1, keepdim=True)
            var = target.var(dim=-1, keepdim=True)
            pred = pred * (var + 1.0e-6) ** 0.5 + mean
        p = self.config.patch_size
        mask_img = unpatchify(mask.unsqueeze(-1).expand(-1, -1, p * p), p, self.patch_embed.grid_size, 1)
        return self.unpatchify(pred), mask_img

    def to_encoder(self, **overrides) -> VisionTransformer:
        """The pretrained encoder as a plain `VisionTransformer` (decoder and mask token dropped); `overrides`
        such as num_classes=10 change its config (a new head starts from scratch)."""
        # Pin where the final norm sits (before pooling: `norm`; after: `fc_norm`), so that a later change of
        # pooling (reset_classifier(global_pool='avg')) keeps the config describing the pretrained modules.
        pinned = {"fc_norm": not isinstance(self.fc_norm, nn.Identity)}
        cfg = self.config.encoder_config(**{**pinned, **overrides})
        vit = VisionTransformer(cfg)
        own = vit.state_dict()
        state = {k: v for k, v in self.state_dict().items() if k in own and v.shape == own[k].shape}
        missing = [k for k in own if k not in state and not k.startswith(("head.", "fc_norm."))]
        if missing:
            raise ConfigError(f"the MAE encoder does not cover the classifier's parameters {missing[:5]}; "
                             "keep the encoder's architecture when converting")
        vit.load_state_dict(state, strict=False)
        vit.pos_embed.requires_grad_(True)
        vit.pretrained_cfg = dict(getattr(self, "pretrained_cfg", None) or {})
        return vit


def encoder_of(model: nn.Module) -> nn.Module:
    """A loaded model as a ViT to read features or attention from: an MAE's encoder (`to_encoder()`), anything
    else as it is."""
    return model.to_encoder() if isinstance(model, MaskedAutoencoderViT) else model


__all__ = ["MAEConfig", "MaskedAutoencoderViT", "mae_config_for", "encoder_of", "random_masking", "patchify",
           "unpatchify", "sincos_pos_embed_2d", "sincos_pos_embed_1d"]
