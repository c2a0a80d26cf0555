"""A model's preprocessing as one typed value (as timm's `PretrainedCfg`): the normalisation, input size, eval crop,
resampling filter and class names that travel with its weights.

`model.pretrained_cfg` stays the plain dict a checkpoint stores (timm's attribute, JSON in the file's metadata);
`Preprocessing.from_dict` is the one reader of it (checking it, and filling what an older or hand-made dict lacks
with the defaults below), `to_dict` the one writer (the checkpoint's keys, in the checkpoint's order).

Defaults, where nothing was recorded: mean = std = 0.5 per channel (inputs in [-1, 1]), bicubic, no crop
(crop_pct 1.0), the model config's own input size, no class names.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Mapping, Optional, Sequence, Tuple

import torch

from ..errors import ConfigError

INTERPOLATIONS = ("nearest", "bilinear", "bicubic", "lanczos", "box", "hamming")
# the keys a checkpoint stores, in the order it stores them; any other key (dataset, tta_flip, objective,
# source_format, ...) travels along after them, in its own order
KEYS = ("mean", "std", "interpolation", "crop_pct", "input_size", "class_names")


@dataclass(frozen=True)
class Preprocessing:
    """How images are turned into a model's inputs: resize (short side to size / crop_pct, `interpolation`),
    centre-crop `input_size` (C, H, W), scale to [0, 1], normalise by `mean`/`std` (one value or one per channel).
    `class_names` name the classifier's outputs; `extra` carries the other recorded entries unchanged."""

    mean: Tuple[float, ...] = (0.5, 0.5, 0.5)
    std: Tuple[float, ...] = (0.5, 0.5, 0.5)
    interpolation: str = "bicubic"
    crop_pct: float = 1.0
    input_size: Optional[Tuple[int, int, int]] = None
    class_names: Optional[Sequence] = None
    extra: Mapping[str, Any] = field(default_factory=dict)

    @classmethod
    def default(cls, config=None) -> "Preprocessing":
        """The defaults for a model config (its channels and image size), or for 3-channel images of any size."""
        if config is None:
            return cls()
        c = int(config.in_chans)
        size = config.img_size if isinstance(config.img_size, (tuple, list)) else (config.img_size, config.img_size)
        return cls(mean=(0.5,) * c, std=(0.5,) * c, input_size=(c, int(size[0]), int(size[1])))

    @classmethod
    def from_dict(cls, d: Optional[Mapping], config=None) -> "Preprocessing":
        """A recorded preprocessing dict (a checkpoint's `pretrained_cfg`, any vitkit version) → Preprocessing;
        missing or null entries take the defaults for `config`. A ValueError names an entry that is unusable."""
        d = {} if d is None else d
        check(d, config)
        base = cls.default(config)
        given = {k: d[k] for k in KEYS if d.get(k) is not None}
        return cls(mean=tuple(given.get("mean", base.mean)), std=tuple(given.get("std", base.std)),
                   interpolation=given.get("interpolation", base.interpolation),
                   crop_pct=given.get("crop_pct", base.crop_pct),
                   input_size=tuple(given["input_size"]) if "input_size" in given else base.input_size,
                   class_names=tuple(d["class_names"]) if isinstance(d.get("class_names"), list)
                   else d.get("class_names"),
                   extra={k: v for k, v in d.items() if k not in KEYS})

    @classmethod
    def of(cls, model) -> "Preprocessing":
        """What `model` records (`model.pretrained_cfg`) over the defaults for its config."""
        return cls.from_dict(getattr(model, "pretrained_cfg", None) or {}, model.config)

    def to_dict(self) -> dict:
        """The dict a checkpoint stores: every key of `KEYS` in that order (lists, as JSON has them), then `extra`."""
        names = self.class_names
        out = {"mean": list(self.mean), "std": list(self.std), "interpolation": self.interpolation,
               "crop_pct": self.crop_pct, "input_size": list(self.input_size) if self.input_size is not None else None,
               "class_names": list(names) if isinstance(names, tuple) else names}
        out.update(self.extra)
        return out

    @property
    def size(self) -> Optional[Tuple[int, int]]:
        """The (H, W) the model takes, or None where unknown."""
        return None if self.input_size is None else (int(self.input_size[1]), int(self.input_size[2]))


def check(d, config=None) -> None:
    """Raise a ValueError naming the first entry of a recorded preprocessing dict that `config` cannot use (mean/std
    of the wrong length or not numbers, input_size not [C, H, W], crop_pct outside (0, 1], an unknown filter)."""
    if not isinstance(d, Mapping):
        raise ConfigError(f"pretrained_cfg is a {type(d).__name__}, not a dict")
    chans = getattr(config, "in_chans", None)
    for k in ("mean", "std"):
        v = d.get(k)
        if v is not None and (not isinstance(v, (list, tuple)) or not (len(v) in (1, chans) if chans else v) or
                              not all(isinstance(x, (int, float)) and not isinstance(x, bool) for x in v) or
                              (k == "std" and min(v) <= 0)):
            raise ConfigError(f"pretrained_cfg {k} {v!r} is not {chans or 'per-channel'} number(s)"
                             f"{' > 0' if k == 'std' else ''}")
    size = d.get("input_size")
    if size is not None and (not isinstance(size, (list, tuple)) or len(size) != 3 or
                             not all(isinstance(x, int) and not isinstance(x, bool) and x > 0 for x in size)):
        raise ConfigError(f"pretrained_cfg input_size {size!r} is not [channels, height, width]")
    crop = d.get("crop_pct")
    if crop is not None and (not isinstance(crop, (int, float)) or isinstance(crop, bool) or not 0 < crop <= 1):
        raise ConfigError(f"pretrained_cfg crop_pct {crop!r} is not in (0, 1]")
    interp = d.get("interpolation")
    if interp is not None and interp not in INTERPOLATIONS:
        raise ConfigError(f"pretrained_cfg interpolation {interp!r} is not a resampling filter")


def _stat(values, x: torch.Tensor) -> torch.Tensor:
    """Per-channel statistics shaped (C, 1, 1), which broadcasts over (C, H, W) and (B, C, H, W) alike."""
    return torch.tensor(list(values), device=x.device).view(-1, 1, 1)


def normalize(x: torch.Tensor, pre: Preprocessing) -> torch.Tensor:
    """Images in [0, 1], (C, H, W) or (B, C, H, W) → the model's inputs: (x - mean) / std."""
    return (x - _stat(pre.mean, x)) / _stat(pre.std, x)


def denormalize(x: torch.Tensor, pre: Preprocessing) -> torch.Tensor:
    """The model's inputs, (C, H, W) or (B, C, H, W) → images on the [0, 1] scale (not clamped): x * std + mean."""
    return x * _stat(pre.std, x) + _stat(pre.mean, x)


__all__ = ["Preprocessing", "KEYS", "INTERPOLATIONS", "check", "normalize", "denormalize"]
