"""The Vision Transformer of Dosovitskiy et al. 2020, "An Image is Worth 16x16 Words" (arXiv 2010.11929).

Patches → linear embedding → [class token, register tokens] + position embeddings → `depth` pre-norm blocks
(x + MHSA(LN(x)), x + MLP(LN(x))) → LayerNorm → pooled token → linear head. Parameter names, shapes and numerics
follow timm's `VisionTransformer`, so a timm state dict loads with strict=True and gives the same logits.
"""
from __future__ import annotations

import math
import os
from typing import Callable, List, Optional, Sequence, Tuple, Union

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from ..errors import ConfigError
from .config import ViTConfig, count_params
from .layers import feature_take_indices, resample_abs_pos_embed, resample_patch_embed, to_2tuple
from .merging import merge_tokens, parse_r, size_bias, size_weighted_mean


EXPLICIT_TRAIN_TOKENS = 256  # CPU training uses the explicit softmax(QK^T/sqrt(d))V up to this many tokens
# The explicit path computes its (B, heads, rows, N) probabilities in blocks of query rows of at most this many
# elements (64 MB in fp32), so what it holds at once does not grow with tokens² (softmax is per row: exact).
ATTN_BLOCK_ELEMENTS = 1 << 24

# sink(probs, row0): receives each block of attention probabilities (B, heads, rows, N) for query rows row0.. .
AttentionSink = Callable[[torch.Tensor, int], None]


class PatchEmbed(nn.Module):
    """Image (B, C, H, W) → patch tokens (B, H/p, W/p, D) by a conv whose kernel and stride are the patch size."""

    def __init__(self, img_size=224, patch_size=16, in_chans=3, embed_dim=768, bias=True, dynamic_img_pad=False,
                 stem: str = "patch", stem_channels: Sequence[int] = ()):
        super().__init__()
        self.patch_size = to_2tuple(patch_size)
        self.img_size = to_2tuple(img_size)
        self.in_chans = in_chans
        self.dynamic_img_pad = dynamic_img_pad
        if stem == "conv":  # timm's HybridEmbed(ConvStem): convolutions down to the grid, then a 1x1 projection
            chans = conv_stem_channels(self.patch_size[0], embed_dim, stem_channels)
            self.backbone = ConvStem(in_chans, chans, conv_stem_strides(self.patch_size[0], chans))
            self.proj = nn.Conv2d(self.backbone.out_channels, embed_dim, kernel_size=1, bias=bias)
        elif stem == "patch":
            self.backbone = None
            self.proj = nn.Conv2d(in_chans, embed_dim, kernel_size=self.patch_size, stride=self.patch_size, bias=bias)
        else:
            raise ConfigError(f"stem must be 'patch' or 'conv', got {stem!r}")

    @property
    def grid_size(self) -> Tuple[int, int]:
        return self.img_size[0] // self.patch_size[0], self.img_size[1] // self.patch_size[1]

    @property
    def num_patches(self) -> int:
        return self.grid_size[0] * self.grid_size[1]

    def dynamic_feat_size(self, img_size: Sequence[int]) -> Tuple[int, int]:
        """The token grid an (H, W) image gives (rounded up when padding)."""
        ph, pw = self.patch_size
        if self.dynamic_img_pad:
            return math.ceil(img_size[0] / ph), math.ceil(img_size[1] / pw)
        return img_size[0] // ph, img_size[1] // pw

    def check_input(self, x: torch.Tensor) -> None:
        """Raise a ValueError that says what is wrong with an input the model cannot take."""
        if x.ndim != 4:
            raise ConfigError(
                f"expected images of shape (B, C, H, W), got a tensor of rank {x.ndim} with shape {tuple(x.shape)}; "
                "add a batch dimension with x.unsqueeze(0) for a single image"
            )
        if x.shape[1] != self.in_chans:
            raise ConfigError(
                f"expected {self.in_chans} input channel(s), got {x.shape[1]} (shape {tuple(x.shape)}); "
                f"convert the images to {self.in_chans} channel(s) or build the model with in_chans={x.shape[1]}"
            )
        ph, pw = self.patch_size
        if not self.dynamic_img_pad and (x.shape[2] % ph or x.shape[3] % pw):
            raise ConfigError(
                f"image size {x.shape[2]}x{x.shape[3]} is not a multiple of the patch size {ph}x{pw}; "
                "resize or crop it, or build the model with dynamic_img_pad=True to pad"
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not torch.compiler.is_compiling() and not torch.jit.is_tracing():
            self.check_input(x)
        if self.dynamic_img_pad:
            ph, pw = self.patch_size
            x = F.pad(x, (0, (pw - x.shape[3] % pw) % pw, 0, (ph - x.shape[2] % ph) % ph))
        if self.backbone is not None:
            if x.device.type == "cpu" and torch.is_autocast_enabled("cpu"):
                # oneDNN's bf16 convolution backward runs ~9x slower than fp32 on CPUs (measured); the stem's few
                # FLOPs run in fp32, the transformer blocks stay in the autocast dtype
                with torch.autocast("cpu", enabled=False):
                    return self.proj(self.backbone(x.float())).permute(0, 2, 3, 1)
            x = self.backbone(x)
        return self.proj(x).permute(0, 2, 3, 1)  # (B, H', W', D)

    def set_input_size(self, img_size=None, patch_size=None) -> None:
        """Change the configured image size and/or patch size (the kernel is FlexiViT-resampled)."""
        if patch_size is not None and to_2tuple(patch_size) != self.patch_size:
            if self.backbone is not None:
                raise ConfigError("a convolutional stem's stride is fixed by its layers: its patch size cannot change; "
                                  "build a model with another patch_size instead")
            new = to_2tuple(patch_size)
            old = self.proj
            proj = nn.Conv2d(old.in_channels, old.out_channels, kernel_size=new, stride=new, bias=old.bias is not None)
            proj = proj.to(device=old.weight.device, dtype=old.weight.dtype)
            with torch.no_grad():
                proj.weight.copy_(resample_patch_embed(old.weight, new))
                if old.bias is not None:
                    proj.bias.copy_(old.bias)
            self.proj, self.patch_size = proj, new
        if img_size is not None:
            self.img_size = to_2tuple(img_size)


def conv_stem_channels(patch_size: int, embed_dim: int, channels: Sequence[int] = ()) -> Tuple[int, ...]:
    """The widths of a convolutional stem for `patch_size` (a power of two): one stride-2 conv per halving, and
    optionally stride-1 convs before them (more widths than halvings); by default timm's tiers
    (embed_dim / 2**k, ..., embed_dim / 2, embed_dim)."""
    n = int(round(math.log2(patch_size))) if patch_size > 1 else 0
    if patch_size < 2 or 2**n != patch_size:
        raise ConfigError(f"a convolutional stem needs a patch size that is a power of two (2, 4, 8, 16), got "
                          f"{patch_size}; use stem='patch' for other sizes")
    if channels:
        if len(channels) < n:
            raise ConfigError(f"stem_channels {tuple(channels)} must give at least one width per stride-2 conv: "
                              f"{n} for patch {patch_size}")
        return tuple(int(c) for c in channels)
    return tuple(max(8, embed_dim // 2**i) for i in range(n))[::-1]


def conv_stem_strides(patch_size: int, channels: Sequence[int]) -> Tuple[int, ...]:
    """Strides of the stem's convs: 1 for the extra leading ones (full resolution), then 2 for each halving."""
    n = int(round(math.log2(patch_size)))
    return (1,) * (len(channels) - n) + (2,) * n


class ConvNormAct(nn.Module):
    """3x3 convolution, then BatchNorm and ReLU (timm's `ConvNormAct` names: `conv`, `bn`)."""

    def __init__(self, in_chs: int, out_chs: int, stride: int, norm_act: bool):
        super().__init__()
        self.conv = nn.Conv2d(in_chs, out_chs, 3, stride=stride, padding=1, bias=not norm_act)
        self.bn = nn.BatchNorm2d(out_chs) if norm_act else nn.Sequential()
        self.act = nn.ReLU(inplace=True) if norm_act else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.bn(self.conv(x)))


class ConvStem(nn.Sequential):
    """Stacked stride-2 3x3 convolutions in place of the patchify convolution (Xiao et al. 2021, "Early
    convolutions help transformers see better"): BN+ReLU after each but the last, as timm's `ConvStem`."""

    def __init__(self, in_chans: int, channels: Sequence[int], strides: Optional[Sequence[int]] = None):
        super().__init__()
        strides = strides or (2,) * len(channels)
        for i, (c, st) in enumerate(zip(channels, strides)):
            self.add_module(str(i), ConvNormAct(in_chans if i == 0 else channels[i - 1], c, st, i < len(channels) - 1))
        self.out_channels = channels[-1]


class PatchDropout(nn.Module):
    """Keep a random subset of the patch tokens while training (PatchDropout, Liu et al. 2022; FLIP): fewer
    tokens, less compute per step, a regulariser. Prefix tokens (class, registers) always stay; off in eval."""

    def __init__(self, prob: float = 0.5, num_prefix_tokens: int = 1):
        super().__init__()
        if not 0 <= prob < 1:
            raise ConfigError(f"patch_drop_rate must be in [0, 1), got {prob}")
        self.prob, self.num_prefix_tokens = prob, num_prefix_tokens

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.prob == 0.0:
            return x
        p = self.num_prefix_tokens
        prefix, x = x[:, :p], x[:, p:]
        keep = max(1, int(x.shape[1] * (1.0 - self.prob)))
        idx = torch.argsort(torch.randn(x.shape[0], x.shape[1], device=x.device), dim=-1)[:, :keep]
        x = x.gather(1, idx.unsqueeze(-1).expand(-1, -1, x.shape[2]))
        return torch.cat((prefix, x), dim=1) if p else x

    def extra_repr(self) -> str:
        return f"prob={self.prob}"


class Attention(nn.Module):
    """Multi-head self-attention: softmax(Q K^T / sqrt(d_k)) V per head, heads concatenated, projected by W^O."""

    def __init__(self, dim, num_heads=8, qkv_bias=True, qk_norm=False, attn_drop=0.0, proj_drop=0.0, norm_layer=None):
        super().__init__()
        if dim % num_heads:
            raise ConfigError(f"embed_dim {dim} is not divisible by num_heads {num_heads}")
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.scale = self.head_dim**-0.5
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.q_norm = norm_layer(self.head_dim) if qk_norm else nn.Identity()
        self.k_norm = norm_layer(self.head_dim) if qk_norm else nn.Identity()
        self.attn_drop = nn.Dropout(attn_drop)
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(proj_drop)

    def forward(
        self, x: torch.Tensor, attn_bias: Optional[torch.Tensor] = None, return_attention: bool = False,
        sink: Optional[AttentionSink] = None,
    ) -> Union[torch.Tensor, Tuple[torch.Tensor, torch.Tensor]]:
        """x: (B, N, D). attn_bias: additive logits bias broadcastable to (B, heads, N, N) (e.g. ToMe's log-size).
        With return_attention, runs the explicit softmax path and also returns the (B, heads, N, N) probabilities;
        with `sink`, hands them block by block of query rows to sink(probs, row0) instead, holding none whole."""
        q, k, v = self.heads(x)
        o, attn = self.attend(q, k, v, attn_bias, return_attention, sink)
        x = self.project(o)
        return (x, attn) if return_attention else x

    def forward_merging(self, x: torch.Tensor, size: Optional[torch.Tensor]) -> Tuple[torch.Tensor, torch.Tensor]:
        """Attention over tokens (B, N, D) that stand for `size` (B, N, 1) patches each (ToMe's proportional
        attention: log(size) added to every key's logits); also returns the head-averaged keys (B, N, Dh), ToMe's
        similarity metric."""
        q, k, v = self.heads(x)
        o, _ = self.attend(q, k, v, size_bias(size, q.dtype))
        return self.project(o), k.mean(dim=1)

    def heads(self, x: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Tokens (B, N, D) → queries, keys, values, each (B, heads, N, head_dim), q and k normed (qk_norm)."""
        B, N, C = x.shape
        q, k, v = self.qkv(x).reshape(B, N, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4).unbind(0)
        return self.q_norm(q), self.k_norm(k), v

    def attend(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, attn_bias: Optional[torch.Tensor] = None,
        return_attention: bool = False, sink: Optional[AttentionSink] = None,
    ) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
        """softmax(q k^T / sqrt(d) + bias) v per head: q (B, heads, Nq, hd), k and v (B, heads, N, hd) → (B, heads,
        Nq, hd), and the probabilities (B, heads, Nq, N) with return_attention (else None)."""
        B, N = q.shape[0], k.shape[2]
        attn = None
        if return_attention or sink is not None or \
                (N <= EXPLICIT_TRAIN_TOKENS and q.device.type == "cpu" and torch.is_grad_enabled()):
            # The explicit path: asked for the weights, or training on a CPU with a short sequence, where it runs
            # 1.1-4x faster than the fused kernels' backward (fp32 and bf16, measured) and its N x N matrix is small.
            # in blocks of query rows without autograd (with it, backward keeps every block anyway: one block)
            rows = N if torch.is_grad_enabled() else max(1, ATTN_BLOCK_ELEMENTS // max(1, B * self.num_heads * N))
            outs, blocks = [], []
            for r0 in range(0, q.shape[2], rows):
                logits = (q[:, :, r0:r0 + rows] * self.scale) @ k.transpose(-2, -1)
                if attn_bias is not None:
                    per_row = attn_bias.ndim >= 2 and attn_bias.shape[-2] != 1
                    logits = logits + (attn_bias[..., r0:r0 + rows, :] if per_row else attn_bias)
                # softmax accumulated in fp32 at least (bf16/fp16 logits), in the input's precision above that
                p = logits.softmax(dim=-1, dtype=torch.promote_types(logits.dtype, torch.float32)).to(q.dtype)
                del logits
                outs.append(self.attn_drop(p) @ v)
                if sink is not None:
                    sink(p, r0)
                if return_attention:
                    blocks.append(p)
            o = outs[0] if len(outs) == 1 else torch.cat(outs, dim=2)
            if return_attention:
                attn = blocks[0] if len(blocks) == 1 else torch.cat(blocks, dim=2)
        else:
            o = F.scaled_dot_product_attention(
                q, k, v, attn_mask=attn_bias, dropout_p=self.attn_drop.p if self.training else 0.0
            )
        return o, attn

    def project(self, o: torch.Tensor) -> torch.Tensor:
        """Heads (B, heads, N, hd) → concatenated (B, N, D) → W^O."""
        B, H, N, hd = o.shape
        return self.proj_drop(self.proj(o.transpose(1, 2).reshape(B, N, H * hd)))


class Mlp(nn.Module):
    """Position-wise feed-forward: Linear → GELU → Linear."""

    def __init__(self, in_features, hidden_features, act_layer=nn.GELU, drop=0.0):
        super().__init__()
        self.fc1 = nn.Linear(in_features, hidden_features)
        self.act = act_layer()
        self.drop1 = nn.Dropout(drop)
        self.fc2 = nn.Linear(hidden_features, in_features)
        self.drop2 = nn.Dropout(drop)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.drop2(self.fc2(self.drop1(self.act(self.fc1(x)))))


class LayerScale(nn.Module):
    """Per-channel learnable scale of a residual branch (CaiT), started small so deep models train."""

    def __init__(self, dim, init_values=1e-5):
        super().__init__()
        self.gamma = nn.Parameter(init_values * torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.gamma


class DropPath(nn.Module):
    """Stochastic depth: drop a whole residual branch per sample while training, scaled to keep the mean."""

    def __init__(self, drop_prob: float = 0.0):
        super().__init__()
        self.drop_prob = drop_prob

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.drop_prob == 0.0 or not self.training:
            return x
        keep = 1.0 - self.drop_prob
        mask = x.new_empty((x.shape[0],) + (1,) * (x.ndim - 1)).bernoulli_(keep)
        return x * mask.div_(keep)

    def extra_repr(self) -> str:
        return f"drop_prob={self.drop_prob}"


class Block(nn.Module):
    """Pre-norm Transformer encoder block: x + MHSA(LN(x)), then x + MLP(LN(x))."""

    def __init__(
        self, dim, num_heads, mlp_ratio=4.0, qkv_bias=True, qk_norm=False, proj_drop=0.0, attn_drop=0.0,
        init_values=None, drop_path=0.0, norm_layer=None, act_layer=nn.GELU,
    ):
        super().__init__()
        self.norm1 = norm_layer(dim)
        self.attn = Attention(dim, num_heads, qkv_bias, qk_norm, attn_drop, proj_drop, norm_layer)
        self.ls1 = LayerScale(dim, init_values) if init_values else nn.Identity()
        self.drop_path1 = DropPath(drop_path) if drop_path > 0 else nn.Identity()
        self.norm2 = norm_layer(dim)
        self.mlp = Mlp(dim, int(dim * mlp_ratio), act_layer, proj_drop)
        self.ls2 = LayerScale(dim, init_values) if init_values else nn.Identity()
        self.drop_path2 = DropPath(drop_path) if drop_path > 0 else nn.Identity()

    def forward(self, x: torch.Tensor, attn_bias: Optional[torch.Tensor] = None) -> torch.Tensor:
        x = x + self.drop_path1(self.ls1(self.attn(self.norm1(x), attn_bias)))
        x = x + self.drop_path2(self.ls2(self.mlp(self.norm2(x))))
        return x

    def forward_merging(self, x: torch.Tensor, size: Optional[torch.Tensor], r: int,
                        num_protected: int) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
        """The block with token merging (ToMe) between attention and MLP: tokens (B, N, D) standing for `size`
        (B, N, 1) patches each (None: one each) → (B, N - r', D) and their sizes; the first `num_protected` stay."""
        if r == 0 and size is None:  # nothing merged yet, nothing to merge: the plain block, bit for bit
            return self(x), None
        y, keys = self.attn.forward_merging(self.norm1(x), size)
        x = x + self.drop_path1(self.ls1(y))
        if r > 0:
            x, size = merge_tokens(x, size, keys, r, num_protected)
        x = x + self.drop_path2(self.ls2(self.mlp(self.norm2(x))))
        return x, size

    def forward_with_attention(self, x: torch.Tensor, sink: Optional[AttentionSink] = None):
        """The same block through the explicit softmax path; also returns (B, heads, N, N) attention, or, with a
        `sink`, hands it over block by block of query rows and returns None in its place."""
        if sink is None:
            y, attn = self.attn(self.norm1(x), return_attention=True)
        else:
            y, attn = self.attn(self.norm1(x), sink=sink), None
        x = x + self.drop_path1(self.ls1(y))
        x = x + self.drop_path2(self.ls2(self.mlp(self.norm2(x))))
        return x, attn


def check_fits_memory(cfg: ViTConfig) -> None:
    """Refuse, before a byte is allocated, a configuration whose fp32 weights alone exceed this machine's memory: a
    slip such as `--embed-dim 1048576` would otherwise die deep inside torch asking for terabytes."""
    if torch.empty(0).device.type == "meta":  # built without memory (checkpoint shape checks)
        return
    try:
        ram = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (AttributeError, ValueError, OSError):  # no sysconf (Windows): nothing to compare with
        return
    n = count_params(cfg)
    if 4 * n > ram:
        raise ConfigError(f"a ViT of embed_dim {cfg.embed_dim}, depth {cfg.depth} and mlp_ratio {cfg.mlp_ratio} has "
                          f"{n / 1e9:.1f} billion parameters, {4 * n / 2**30:.0f} GiB in fp32 before any training "
                          f"state, more than this machine's {ram / 2**30:.0f} GiB; choose a smaller model",
                          field="embed_dim")


class VisionTransformer(nn.Module):
    """ViT with timm's parameter layout. Build it from a `ViTConfig` or keyword arguments of the same names."""

    def __init__(self, config: Optional[ViTConfig] = None, **kwargs):
        super().__init__()
        cfg = config if config is not None else ViTConfig()
        if kwargs:
            cfg = cfg.replace(**kwargs)
        cfg.validate()
        self.config = cfg
        if cfg.global_pool not in ("token", "avg", ""):
            raise ConfigError(f"global_pool must be 'token', 'avg' or '', got {cfg.global_pool!r}")
        if cfg.global_pool == "token" and not cfg.class_token:
            raise ConfigError("global_pool='token' needs class_token=True; use global_pool='avg' without one")
        check_fits_memory(cfg)
        norm_layer = lambda d: nn.LayerNorm(d, eps=cfg.norm_eps)  # noqa: E731
        dim = cfg.embed_dim
        self.num_classes = cfg.num_classes
        self.global_pool = cfg.global_pool
        self.num_features = self.embed_dim = dim
        self.in_chans = cfg.in_chans
        self.num_reg_tokens = cfg.reg_tokens
        self.num_prefix_tokens = int(cfg.class_token) + cfg.reg_tokens
        self.has_class_token = cfg.class_token
        self.no_embed_class = cfg.no_embed_class
        self.grad_checkpointing = False
        self.tome_r: Optional[Union[int, List[int]]] = None  # tokens merged per block (ToMe, `apply_tome`); None: off

        self.patch_embed = PatchEmbed(cfg.img_size, cfg.patch_size, cfg.in_chans, dim, bias=not cfg.pre_norm,
                                      dynamic_img_pad=cfg.dynamic_img_pad, stem=cfg.stem,
                                      stem_channels=cfg.stem_channels)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim)) if cfg.class_token else None
        self.reg_token = nn.Parameter(torch.zeros(1, cfg.reg_tokens, dim)) if cfg.reg_tokens else None
        embed_len = self.patch_embed.num_patches + (0 if cfg.no_embed_class else self.num_prefix_tokens)
        self.pos_embed = nn.Parameter(torch.zeros(1, embed_len, dim))
        self.pos_drop = nn.Dropout(cfg.pos_drop_rate)
        self.patch_drop = PatchDropout(cfg.patch_drop_rate, self.num_prefix_tokens) if cfg.patch_drop_rate > 0 \
            else nn.Identity()
        self.norm_pre = norm_layer(dim) if cfg.pre_norm else nn.Identity()
        # on the CPU whatever the default device: the model also builds under torch.device("meta") (shape checks)
        dpr = [x.item() for x in torch.linspace(0, cfg.drop_path_rate, cfg.depth, device="cpu")]
        self.blocks = nn.Sequential(*[
            Block(dim, cfg.num_heads, cfg.mlp_ratio, cfg.qkv_bias, cfg.qk_norm, cfg.proj_drop_rate,
                  cfg.attn_drop_rate, cfg.init_values, dpr[i], norm_layer)
            for i in range(cfg.depth)
        ])
        use_fc_norm = cfg.global_pool == "avg" if cfg.fc_norm is None else cfg.fc_norm
        self.norm = norm_layer(dim) if not use_fc_norm else nn.Identity()
        self.fc_norm = norm_layer(dim) if use_fc_norm else nn.Identity()
        self.head_drop = nn.Dropout(cfg.drop_rate)
        self.head = nn.Linear(dim, cfg.num_classes) if cfg.num_classes > 0 else nn.Identity()
        self.init_weights(cfg.weight_init)

    # ---- initialisation -------------------------------------------------------------------------------------
    def init_weights(self, mode: str = "xavier") -> None:
        """'xavier' (default): xavier-uniform linears and patch kernel, zero biases, as MAE/DeiT-III do;
        'timm': truncated normal 0.02 linears (timm's `init_weights_vit_timm`). Both: pos-embed trunc-normal 0.02,
        class/register tokens normal 1e-6."""
        if mode not in ("xavier", "timm"):
            raise ConfigError(f"weight_init must be 'xavier' or 'timm', got {mode!r}")
        nn.init.trunc_normal_(self.pos_embed, std=0.02, a=-2.0, b=2.0)
        if self.cls_token is not None:
            nn.init.normal_(self.cls_token, std=1e-6)
        if self.reg_token is not None:
            nn.init.normal_(self.reg_token, std=1e-6)
        for m in self.modules():
            if isinstance(m, nn.Linear):
                if mode == "xavier":
                    nn.init.xavier_uniform_(m.weight)
                else:
                    nn.init.trunc_normal_(m.weight, std=0.02, a=-2.0, b=2.0)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
        if mode == "xavier":  # the patch projection is a linear layer on flattened patches
            w = self.patch_embed.proj.weight
            nn.init.xavier_uniform_(w.view(w.shape[0], -1))
        if self.patch_embed.backbone is not None:  # conv stem: He init for ReLU convs, as torchvision's ResNets
            for m in self.patch_embed.backbone.modules():
                if isinstance(m, nn.Conv2d):
                    nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
                    if m.bias is not None:
                        nn.init.zeros_(m.bias)
        for blk in self.blocks:
            for ls in (blk.ls1, blk.ls2):
                if isinstance(ls, LayerScale):
                    nn.init.constant_(ls.gamma, self.config.init_values)

    # ---- the timm model interface ---------------------------------------------------------------------------
    @torch.jit.ignore
    def no_weight_decay(self) -> set:
        """Parameter names that take no weight decay besides biases and norms (found by rank in the optimizer)."""
        return {"pos_embed", "cls_token", "reg_token"}

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Recompute each block's activations in the backward pass: much less memory for ~30% more compute."""
        self.grad_checkpointing = enable

    def get_classifier(self) -> nn.Module:
        return self.head

    def reset_classifier(self, num_classes: int, global_pool: Optional[str] = None) -> None:
        """Replace the head with a fresh one for `num_classes` (0 → features only)."""
        if global_pool is not None:
            if global_pool not in ("token", "avg", ""):
                raise ConfigError(f"global_pool must be 'token', 'avg' or '', got {global_pool!r}")
            if global_pool == "token" and not self.has_class_token:
                raise ConfigError("global_pool='token' needs a class token")
            self.global_pool = global_pool
        self.num_classes = num_classes
        w = self.pos_embed
        self.head = nn.Linear(self.embed_dim, num_classes).to(w.device, w.dtype) if num_classes > 0 else nn.Identity()
        if num_classes > 0:
            nn.init.zeros_(self.head.bias)
            nn.init.trunc_normal_(self.head.weight, std=0.02)
        # Pin where the final norm sits: changing the pooling keeps the trained norm, so a rebuild from the config
        # must not re-derive it from the new pooling (which would expect fc_norm for 'avg').
        self.config = self.config.replace(num_classes=num_classes, global_pool=self.global_pool,
                                          fc_norm=not isinstance(self.fc_norm, nn.Identity))

    def set_input_size(self, img_size=None, patch_size=None) -> None:
        """Change the configured image and/or patch size for good: pos-embed bicubic-resampled to the new grid,
        the patch kernel FlexiViT-resampled to the new patch size."""
        sizes = {k: v for k, v in (("img_size", img_size), ("patch_size", patch_size)) if v is not None}
        self.config.replace(**sizes).validate()  # a grid the sizes cannot make: a one-line ConfigError, up front
        prev_grid = self.patch_embed.grid_size
        self.patch_embed.set_input_size(img_size=img_size, patch_size=patch_size)
        new_grid = self.patch_embed.grid_size
        if new_grid != prev_grid:
            prefix = 0 if self.no_embed_class else self.num_prefix_tokens
            with torch.no_grad():
                pe = resample_abs_pos_embed(self.pos_embed.data, new_grid, prev_grid, prefix)
            self.pos_embed = nn.Parameter(pe, requires_grad=self.pos_embed.requires_grad)
        self.config = self.config.replace(img_size=self.patch_embed.img_size[0] if self.patch_embed.img_size[0] ==
                                          self.patch_embed.img_size[1] else self.patch_embed.img_size,
                                          patch_size=self.patch_embed.patch_size[0])

    def _pos_embed(self, x: torch.Tensor) -> torch.Tensor:
        """(B, H', W', D) patch tokens → (B, prefix + H'W', D) with prefix tokens and position embeddings."""
        B, H, W, D = x.shape
        pos_embed = resample_abs_pos_embed(
            self.pos_embed, (H, W), self.patch_embed.grid_size, 0 if self.no_embed_class else self.num_prefix_tokens
        )
        x = x.reshape(B, H * W, D)
        to_cat = []
        if self.cls_token is not None:
            to_cat.append(self.cls_token.expand(B, -1, -1))
        if self.reg_token is not None:
            to_cat.append(self.reg_token.expand(B, -1, -1))
        if self.no_embed_class:
            x = x + pos_embed
            if to_cat:
                x = torch.cat(to_cat + [x], dim=1)
        else:
            if to_cat:
                x = torch.cat(to_cat + [x], dim=1)
            x = x + pos_embed
        return self.pos_drop(x)

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        """Images (B, C, H, W) → input tokens (B, N, D) of the first block."""
        return self.norm_pre(self.patch_drop(self._pos_embed(self.patch_embed(x))))

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """Images (B, C, H, W) → all output tokens (B, prefix + H'W', D) after the final norm (fewer if merging)."""
        return self.forward_features_sizes(x)[0]

    def forward_features_sizes(self, x: torch.Tensor) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
        """Images → output tokens (B, N', D) after the final norm, and the patches each stands for (B, N', 1): None
        unless `tome_r` merges tokens (each block merging tome_r, or tome_r[i], of them)."""
        x = self.embed(x)
        if self.tome_r is None:
            if self.grad_checkpointing and torch.is_grad_enabled():
                for blk in self.blocks:
                    x = checkpoint(blk, x, use_reentrant=False)
            else:
                x = self.blocks(x)
            return self.norm(x), None
        size = None
        for blk, r in zip(self.blocks, parse_r(len(self.blocks), self.tome_r)):
            x, size = blk.forward_merging(x, size, r, self.num_prefix_tokens)
        return self.norm(x), size

    def pool(self, x: torch.Tensor, size: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Tokens (B, N, D) → one vector per image (B, D): the class token or the mean of the patch tokens (each
        weighing the patches it stands for, `size` (B, N, 1), when tokens were merged)."""
        if self.global_pool == "avg":
            p = self.num_prefix_tokens
            return size_weighted_mean(x[:, p:], size[:, p:] if size is not None else None)
        if self.global_pool == "token":
            return x[:, 0]
        return x

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False,
                     size: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Tokens (B, N, D) → logits (B, classes), or the pooled, normed features (B, D) with pre_logits."""
        x = self.head_drop(self.fc_norm(self.pool(x, size)))
        return x if pre_logits else self.head(x)

    def forward(self, x: torch.Tensor, return_attention: bool = False):
        """Images (B, C, H, W) → logits (B, classes). With return_attention, also every block's attention
        probabilities, a list of `depth` tensors (B, heads, N, N), from the explicit softmax path."""
        if not return_attention:
            x, size = self.forward_features_sizes(x)
            return self.forward_head(x, size=size)
        self.check_unmerged("attention maps")
        x = self.embed(x)
        attns = []
        for blk in self.blocks:
            x, a = blk.forward_with_attention(x)
            attns.append(a)
        return self.forward_head(self.norm(x)), attns

    def check_unmerged(self, what: str) -> None:
        """Refuse what token merging leaves undefined (per-token maps of a sequence that shrinks)."""
        if self.tome_r is not None:
            raise ConfigError(f"{what} are not defined with token merging; call remove_tome(model) first")

    def forward_attention(self, x: torch.Tensor, sink: Callable[[int, torch.Tensor, int], None]) -> torch.Tensor:
        """Images (B, C, H, W) → logits, handing every block's attention probabilities to sink(block, probs (B,
        heads, rows, N), row0) block by block of query rows: attention maps in memory that grows with N, not
        depth · heads · N²."""
        self.check_unmerged("attention maps")
        x = self.embed(x)
        for i, blk in enumerate(self.blocks):
            x, _ = blk.forward_with_attention(x, sink=lambda p, r0, i=i: sink(i, p, r0))
        return self.forward_head(self.norm(x))

    def forward_intermediates(
        self,
        x: torch.Tensor,
        indices: Optional[Union[int, List[int]]] = None,
        return_prefix_tokens: bool = False,
        norm: bool = False,
        stop_early: bool = False,
        output_fmt: str = "NCHW",
        intermediates_only: bool = False,
    ):
        """Chosen blocks' outputs as in timm: `indices` int → the last n blocks, list → those blocks.
        Returns (final normed tokens, [per-block maps (B, D, H', W') or tokens (B, H'W', D)])."""
        self.check_unmerged("intermediate feature maps")
        if output_fmt not in ("NCHW", "NLC"):
            raise ConfigError(f"output_fmt must be 'NCHW' or 'NLC', got {output_fmt!r}")
        take, max_index = feature_take_indices(len(self.blocks), indices)
        B, _, height, width = x.shape
        x = self.embed(x)
        blocks = self.blocks[: max_index + 1] if stop_early else self.blocks
        intermediates = []
        for i, blk in enumerate(blocks):
            x = checkpoint(blk, x, use_reentrant=False) if self.grad_checkpointing and torch.is_grad_enabled() \
                else blk(x)
            if i in take:
                intermediates.append(self.norm(x) if norm else x)
        npt = self.num_prefix_tokens
        prefix = [y[:, :npt] for y in intermediates]
        intermediates = [y[:, npt:] for y in intermediates]
        if output_fmt == "NCHW":
            H, W = self.patch_embed.dynamic_feat_size((height, width))
            intermediates = [y.reshape(B, H, W, -1).permute(0, 3, 1, 2).contiguous() for y in intermediates]
        if return_prefix_tokens and npt:
            intermediates = list(zip(intermediates, prefix))
        if intermediates_only:
            return intermediates
        return self.norm(x), intermediates

    def extra_repr(self) -> str:
        c = self.config
        return f"config={c.name or 'custom'} img_size={c.img_size} patch_size={c.patch_size}"


def require_vit(model, what: str) -> None:
    """Refuse anything but a vitkit `VisionTransformer` (a DeiT is one; an MAE is not: it hands one over)."""
    if not isinstance(model, VisionTransformer):
        hint = "; call .to_encoder() on it first, which gives its encoder as a ViT" if hasattr(model, "to_encoder") \
            else ""
        raise TypeError(f"{what} needs a vitkit VisionTransformer, got {type(model).__name__}{hint}")


__all__ = ["PatchEmbed", "ConvStem", "PatchDropout", "Attention", "Mlp", "LayerScale", "DropPath", "Block",
           "VisionTransformer", "require_vit"]
