"""Model configurations as data: one `ViTConfig` dataclass and a registry of named configs (timm's names)."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence, Tuple, Union

from ..errors import ConfigError

IntOrPair = Union[int, Tuple[int, int]]


def replace_checked(config, changes: dict, what: str):
    """dataclasses.replace for a config, refusing unknown option names with a list of the known ones."""
    known = {f.name for f in dataclasses.fields(config)}
    unknown = sorted(set(changes) - known)
    if unknown:
        raise ConfigError(f"unknown {what} option(s) {unknown}; known options: {sorted(known)}")
    return dataclasses.replace(config, **changes)


@dataclass(frozen=True)
class ViTConfig:
    """Everything that defines a ViT's architecture; argument names follow timm's `VisionTransformer`."""

    img_size: IntOrPair = 224
    patch_size: int = 16
    in_chans: int = 3
    num_classes: int = 1000
    global_pool: str = "token"  # 'token' (class token), 'avg' (mean of patch tokens) or '' (no pooling)
    embed_dim: int = 768
    depth: int = 12
    num_heads: int = 12
    mlp_ratio: float = 4.0
    qkv_bias: bool = True
    qk_norm: bool = False
    init_values: Optional[float] = None  # LayerScale initial value; None → no LayerScale
    class_token: bool = True
    reg_tokens: int = 0  # register tokens ("Vision Transformers Need Registers")
    no_embed_class: bool = False  # position embeddings cover the patch tokens only (DeiT-III, big_vision)
    pre_norm: bool = False  # LayerNorm before the blocks (CLIP); the patch projection then has no bias
    fc_norm: Optional[bool] = None  # norm after pooling instead of before; None → on for 'avg' pooling
    dynamic_img_pad: bool = False  # pad inputs whose size is not a multiple of the patch size
    norm_eps: float = 1e-6
    drop_rate: float = 0.0  # dropout before the head
    pos_drop_rate: float = 0.0
    proj_drop_rate: float = 0.0  # dropout after the attention projection and in the MLP
    attn_drop_rate: float = 0.0
    drop_path_rate: float = 0.0  # stochastic depth, linearly increasing with depth up to this rate
    patch_drop_rate: float = 0.0  # PatchDropout: share of patch tokens dropped at random while training
    stem: str = "patch"  # 'patch' (one conv, kernel = stride = patch) or 'conv' (stacked stride-2 3x3 convs)
    stem_channels: Tuple[int, ...] = ()  # conv stem widths: extra leading ones are stride-1 convs; () → timm's
    weight_init: str = "xavier"
    name: str = ""  # the registry name this config came from, if any

    def replace(self, **changes) -> "ViTConfig":
        """A copy with some fields changed; unknown names are a clear error."""
        return replace_checked(self, changes, "model")

    @classmethod
    def check_fields(cls, values: dict) -> None:
        """Each given option alone: a known name, the right type, a sensible range (a one-line ConfigError naming
        it); `validate` adds the checks between options. Model options from the CLI and Python go through here."""
        from .. import validate as v

        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ConfigError(f"unknown model option(s) {unknown}; known options: {sorted(known)}")
        for k, x in values.items():
            if k == "img_size":
                if isinstance(x, (tuple, list)):
                    if len(x) != 2:
                        raise ConfigError(f"img_size must be one size or a pair (H, W), got {x!r}", field=k)
                    for s in x:
                        v.integer(s, k, lo=1)
                else:
                    v.integer(x, k, lo=1)
            elif k in ("patch_size", "in_chans", "embed_dim", "depth", "num_heads"):
                v.integer(x, k, lo=1)
            elif k in ("num_classes", "reg_tokens"):
                v.integer(x, k, lo=0)
            elif k == "mlp_ratio":
                v.number(x, k, lo=0, lo_open=True)
            elif k in ("norm_eps",):
                v.number(x, k, lo=0, lo_open=True)
            elif k == "init_values":
                v.number(x, k, lo=0, lo_open=True, optional=True)
            elif k in ("drop_rate", "pos_drop_rate", "proj_drop_rate", "attn_drop_rate", "drop_path_rate",
                       "patch_drop_rate"):
                v.number(x, k, lo=0, hi=1, hi_open=True)
            elif k in ("qkv_bias", "qk_norm", "class_token", "no_embed_class", "pre_norm", "dynamic_img_pad"):
                v.flag(x, k)
            elif k == "fc_norm":
                v.flag(x, k, optional=True)
            elif k == "global_pool":
                v.choice(x, k, ("token", "avg", ""))
            elif k == "stem":
                v.choice(x, k, ("patch", "conv"))
            elif k == "weight_init":
                v.choice(x, k, ("xavier", "timm"))
            elif k == "stem_channels":
                if not isinstance(x, (tuple, list)):
                    raise ConfigError(f"stem_channels must be a list of widths, got {x!r}", field=k)
                for c in x:
                    v.integer(c, k, lo=1)
            elif k == "name" and not isinstance(x, str):
                raise ConfigError(f"name must be a string, got {x!r}", field=k)

    def validate(self) -> None:
        self.check_fields({f.name: getattr(self, f.name) for f in dataclasses.fields(ViTConfig)})
        if self.embed_dim % self.num_heads:
            raise ConfigError(f"embed_dim {self.embed_dim} must be divisible by num_heads {self.num_heads}",
                              field="embed_dim")
        h, w = (self.img_size, self.img_size) if isinstance(self.img_size, int) else self.img_size
        if h % self.patch_size or w % self.patch_size:
            raise ConfigError(f"img_size {self.img_size} must be a multiple of patch_size {self.patch_size}",
                              field="img_size")
        if self.stem == "conv":
            from .vit import conv_stem_channels

            conv_stem_channels(self.patch_size, self.embed_dim, self.stem_channels)

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        if isinstance(d["img_size"], tuple):
            d["img_size"] = list(d["img_size"])
        d["stem_channels"] = list(d["stem_channels"])
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "ViTConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        d = {k: v for k, v in d.items() if k in known}
        if isinstance(d.get("img_size"), list):
            d["img_size"] = tuple(d["img_size"])
        if "stem_channels" in d:
            d["stem_channels"] = tuple(d["stem_channels"] or ())
        return cls(**d)

    @property
    def grid_size(self) -> Tuple[int, int]:
        h, w = (self.img_size, self.img_size) if isinstance(self.img_size, int) else self.img_size
        return h // self.patch_size, w // self.patch_size


_SIZES = {  # (embed_dim, depth, num_heads) from the paper (Table 1) and DeiT for tiny/small
    "tiny": (192, 12, 3),
    "small": (384, 12, 6),
    "base": (768, 12, 12),
    "large": (1024, 24, 16),
    "huge": (1280, 32, 16),
}

_REGISTRY: Dict[str, ViTConfig] = {}


def register(name: str, **kwargs) -> ViTConfig:
    cfg = ViTConfig(name=name, **kwargs)
    cfg.validate()
    _REGISTRY[name] = cfg
    return cfg


for _size, (_dim, _depth, _heads) in _SIZES.items():
    for _patch in (8, 14, 16, 32):
        register(f"vit_{_size}_patch{_patch}_224", embed_dim=_dim, depth=_depth, num_heads=_heads, patch_size=_patch,
                 img_size=224)
# Fine-tuning resolution used in the paper (and timm's augreg releases).
for _size in ("tiny", "small", "base", "large"):
    for _patch in (16, 32):
        _dim, _depth, _heads = _SIZES[_size]
        register(f"vit_{_size}_patch{_patch}_384", embed_dim=_dim, depth=_depth, num_heads=_heads,
                 patch_size=_patch, img_size=384)
register("vit_huge_patch14_518", embed_dim=1280, depth=32, num_heads=16, patch_size=14, img_size=518)

# Small images (28-32 px): patch 4 on 32x32 CIFAR-style inputs, patch 7/4 on 28x28 digits.
register("vit_tiny_patch4_32", embed_dim=192, depth=12, num_heads=3, patch_size=4, img_size=32, num_classes=10)
register("vit_small_patch4_32", embed_dim=384, depth=12, num_heads=6, patch_size=4, img_size=32, num_classes=10)
register("vit_mini_patch4_32", embed_dim=192, depth=6, num_heads=3, patch_size=4, img_size=32, num_classes=10)
register("vit_mini_patch7_28", embed_dim=128, depth=6, num_heads=4, patch_size=7, img_size=28, in_chans=1,
         num_classes=10)
register("vit_mini_patch4_28", embed_dim=128, depth=6, num_heads=4, patch_size=4, img_size=28, in_chans=1,
         num_classes=10)
# The demo model (`vitkit train` on mnist5k): narrow enough that a CPU sees ~35 epochs of the 4,000 digits in the
# 4.5-minute budget, which beats a wider model that sees fewer (measured; see the README).
register("vit_micro_patch7_28", embed_dim=64, depth=6, num_heads=4, patch_size=7, img_size=28, in_chans=1,
         num_classes=10, global_pool="avg")


def list_models(pattern: str = "") -> List[str]:
    """Registered config names, sorted; `pattern` is a substring or fnmatch pattern."""
    import fnmatch

    names = sorted(_REGISTRY)
    if not pattern:
        return names
    if any(c in pattern for c in "*?["):
        return [n for n in names if fnmatch.fnmatch(n, pattern)]
    return [n for n in names if pattern in n]


def get_config(name: str, **overrides) -> ViTConfig:
    """The registered config `name`, with `overrides` applied."""
    if name not in _REGISTRY:
        import difflib

        close = difflib.get_close_matches(name, _REGISTRY, n=3)
        hint = f"; did you mean {', '.join(close)}?" if close else "; `vitkit models` lists them"
        raise ConfigError(f"unknown model {name!r}{hint}")
    return _REGISTRY[name].replace(**overrides) if overrides else _REGISTRY[name]


def count_flops(cfg: ViTConfig, img_size: Optional[IntOrPair] = None,
                block_tokens: Optional[Sequence[Tuple[int, int]]] = None) -> Dict[str, float]:
    """Analytic forward cost of one image: multiply-accumulates (as timm/fvcore count them) and FLOPs (= 2 MACs).
    Counts the matmuls (patch projection, qkv, QK^T, AV, projection, MLP, head); norms and softmax are ignored.
    block_tokens: each block's (attention, MLP) token counts where they shrink along the depth (token merging);
    by default every block sees all the tokens."""
    size = img_size if img_size is not None else cfg.img_size
    h, w = (size, size) if isinstance(size, int) else size
    n_patches = (h // cfg.patch_size) * (w // cfg.patch_size)
    n = n_patches + int(cfg.class_token) + cfg.reg_tokens
    d = cfg.embed_dim
    f = int(d * cfg.mlp_ratio)
    patch = n_patches * cfg.in_chans * cfg.patch_size**2 * d
    if cfg.stem == "conv":  # each 3x3 conv at its output resolution, then the 1x1 projection
        from .vit import conv_stem_channels

        from .vit import conv_stem_strides

        patch, c_in, hh, ww = 0, cfg.in_chans, h, w
        chans = conv_stem_channels(cfg.patch_size, d, cfg.stem_channels)
        for c, st in zip(chans, conv_stem_strides(cfg.patch_size, chans)):
            hh, ww = -(-hh // st), -(-ww // st)
            patch += hh * ww * c_in * 9 * c
            c_in = c
        patch += n_patches * c_in * d
    blocks = sum(a * d * 3 * d + 2 * a * a * d + a * d * d + 2 * m * d * f
                 for a, m in (block_tokens if block_tokens is not None else [(n, n)] * cfg.depth))
    head = d * cfg.num_classes
    macs = patch + blocks + head
    return {"macs": float(macs), "flops": 2.0 * macs, "tokens": n}


def model_table(pattern: str = "") -> List[dict]:
    """One row per registered config matching `pattern` (as `list_models`): name, img_size, patch, dim, depth,
    heads, params_M and GFLOPs, the table `vitkit models` prints; a ConfigError when none matches."""
    rows = []
    for name in list_models(pattern or ""):
        cfg = get_config(name)
        rows.append({"name": name, "img_size": cfg.img_size, "patch": cfg.patch_size, "dim": cfg.embed_dim,
                     "depth": cfg.depth, "heads": cfg.num_heads, "params_M": round(count_params(cfg) / 1e6, 2),
                     "GFLOPs": round(count_flops(cfg)["flops"] / 1e9, 2)})
    if not rows:
        raise ConfigError(f"no model matches {pattern!r}; run `vitkit models` to see all")
    return rows


def count_params(cfg: ViTConfig) -> int:
    """Parameter count from the config alone (matches the built model)."""
    d, f = cfg.embed_dim, int(cfg.embed_dim * cfg.mlp_ratio)
    gh, gw = cfg.grid_size
    prefix = int(cfg.class_token) + cfg.reg_tokens
    n = d * cfg.in_chans * cfg.patch_size**2 + (0 if cfg.pre_norm else d)
    if cfg.stem == "conv":  # 3x3 convs (BN after all but the last, which has a bias) and the 1x1 projection
        from .vit import conv_stem_channels

        chans = conv_stem_channels(cfg.patch_size, d, cfg.stem_channels)
        n, c_in = (0 if cfg.pre_norm else d), cfg.in_chans
        for i, c in enumerate(chans):
            n += c_in * 9 * c + (2 * c if i < len(chans) - 1 else c)
            c_in = c
        n += c_in * d
    n += prefix * d + (gh * gw + (0 if cfg.no_embed_class else prefix)) * d
    n += 2 * d if cfg.pre_norm else 0
    block = 2 * d + 3 * d * d + (3 * d if cfg.qkv_bias else 0) + d * d + d + 2 * d + d * f + f + f * d + d
    block += 2 * (cfg.embed_dim // cfg.num_heads) * 2 if cfg.qk_norm else 0
    block += 2 * d if cfg.init_values else 0
    n += cfg.depth * block + 2 * d  # final norm or fc_norm
    n += (d * cfg.num_classes + cfg.num_classes) if cfg.num_classes else 0
    return n

