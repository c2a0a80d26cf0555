"""Load weights from wherever they come from into vitkit's ViT, adapting size, patch and head on the way.

This is the single entry point for starting from pretrained weights (`vitkit train --init`): vitkit checkpoints,
timm/DeiT/MAE state dicts, Hugging Face ViT folders, Google `.npz` (vit_jax, big_vision), torchvision state
dicts, and hub names. The format is detected from the file; `fmt` forces one.
"""
from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Dict, Optional

import torch

from ..errors import CheckpointError
from ..models import Preprocessing, VisionTransformer, get_config, list_models
from ..models.deit import VisionTransformerDistilled
from . import convert
from .checkpoint import is_vitkit_checkpoint, load_state_dict_checked, load_vit
from .files import download_from_hub, looks_like_hub_name, read_folder_weights, read_json, read_weights
from .infer import infer_config

log = logging.getLogger(__name__)

IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
HALF = (0.5, 0.5, 0.5)  # Google's and Hugging Face's [-1, 1] inputs
_PIL_RESAMPLE = {0: "nearest", 1: "lanczos", 2: "bilinear", 3: "bicubic", 4: "box", 5: "hamming"}


@dataclass
class Source:
    """A checkpoint read and converted to timm's layout, with what its format told beyond the shapes."""

    state: Dict[str, torch.Tensor]
    fmt: str
    name: str
    hints: dict = field(default_factory=dict)
    preprocessing: Preprocessing = field(default_factory=Preprocessing)


def adapt_model(model: VisionTransformer, img_size=None, patch_size=None, num_classes: Optional[int] = None,
                global_pool: Optional[str] = None) -> VisionTransformer:
    """Resample a loaded model to a new image/patch size and give it a fresh head for `num_classes`."""
    if img_size is not None or patch_size is not None:
        model.set_input_size(img_size=img_size, patch_size=patch_size)
        pcfg = getattr(model, "pretrained_cfg", None)
        if pcfg is not None:
            h, w = model.patch_embed.img_size
            pcfg["input_size"] = [model.in_chans, int(h), int(w)]
    if global_pool is not None and num_classes is None and global_pool != model.global_pool:
        if isinstance(model, VisionTransformerDistilled) or global_pool not in ("token", "avg", "") or \
                (global_pool == "token" and not model.has_class_token):
            raise CheckpointError(f"this model cannot pool with global_pool={global_pool!r}")
        model.global_pool = global_pool  # the trained head stays; only the pooled token changes
        model.config = model.config.replace(global_pool=global_pool)
    if num_classes is not None and (num_classes != model.num_classes or global_pool is not None):
        model.reset_classifier(num_classes, global_pool=global_pool)
        pcfg = getattr(model, "pretrained_cfg", None)
        if pcfg:
            pcfg["class_names"] = None
    return model


def _preprocessing(mean, std, interpolation, crop_pct, class_names=None) -> Preprocessing:
    return Preprocessing(mean=tuple(mean), std=tuple(std), interpolation=interpolation, crop_pct=crop_pct,
                         class_names=tuple(class_names) if isinstance(class_names, list) else class_names)


def _hf_preprocessing(folder: Path, config: dict) -> Preprocessing:
    """ViTImageProcessor's defaults (mean/std 0.5, bilinear resize, no crop), overridden by preprocessor_config.json;
    class names from id2label unless they are the LABEL_i placeholders."""
    pp = read_json(folder / "preprocessor_config.json") if (folder / "preprocessor_config.json").is_file() else {}
    mean, std = pp.get("image_mean", HALF), pp.get("image_std", HALF)
    interp = _PIL_RESAMPLE.get(pp.get("resample", 2), "bilinear")
    crop = 1.0
    if pp.get("do_center_crop") and isinstance(pp.get("size"), dict) and isinstance(pp.get("crop_size"), dict):
        s, c = pp["size"], pp["crop_size"]
        short = s.get("shortest_edge") or s.get("height")
        if short and c.get("height"):
            crop = round(c["height"] / short, 4)
    names = None
    id2label = config.get("id2label") or {}
    if id2label:
        names = [id2label.get(str(i), id2label.get(i)) for i in range(len(id2label))]
        if all(n == f"LABEL_{i}" for i, n in enumerate(names)):
            names = None
    return _preprocessing(mean, std, interp, crop, names)


def _timm_hub_hints(config: dict) -> tuple:
    """num_heads and preprocessing from a timm hub `config.json` (architecture, model_args, pretrained_cfg)."""
    hints = {}
    args = config.get("model_args") or {}
    arch = str(config.get("architecture", "")).split(".")[0]
    if args.get("num_heads"):
        hints["num_heads"] = int(args["num_heads"])
    elif arch in list_models():
        hints["num_heads"] = get_config(arch).num_heads
    for k in ("no_embed_class", "global_pool", "img_size"):
        if k in args:
            hints[k] = args[k]
    pc = config.get("pretrained_cfg") or {}
    pcfg = _preprocessing(pc.get("mean") or HALF, pc.get("std") or HALF,
                          pc.get("interpolation") or "bicubic", pc.get("crop_pct") or 0.9,
                          pc.get("label_names") or config.get("label_names"))
    return hints, pcfg


def _timm_preprocessing(state) -> Preprocessing:
    """What a bare timm state dict most likely wants: DeiT and MAE use ImageNet statistics (crop 0.875); Google's
    AugReg weights in timm use mean/std 0.5 with crop 0.9 (timm's `_cfg`)."""
    if "dist_token" in state or any(k.startswith("decoder") for k in state):
        return _preprocessing(IMAGENET_MEAN, IMAGENET_STD, "bicubic", 0.875)
    return _preprocessing(HALF, HALF, "bicubic", 0.9)


def _convert(fmt: str, state, name: str, config: Optional[dict] = None):
    try:
        if fmt == "timm":
            return convert.from_timm(state)
        if fmt == "hf":
            return convert.from_hf(state, config)
        if fmt == "torchvision":
            return convert.from_torchvision(state)
        if fmt == "npz":
            return convert.from_npz(state)
    except (KeyError, StopIteration) as e:
        detected = convert.detect_format(state)
        hint = (f"; its keys look like the {detected} layout (let the format be detected: drop --from, or "
                "--init-format in train)") if detected and detected != fmt else ""
        raise CheckpointError(f"{name} is not a complete {fmt} ViT checkpoint: no tensor {e}{hint}") from None
    raise CheckpointError(f"unknown format {fmt!r}; choose one of {', '.join(convert.FORMATS)}")


def read_source(path: Path, fmt: Optional[str] = None) -> Source:
    """Read and convert a checkpoint file or folder (not a vitkit checkpoint) to timm's layout."""
    name = str(path)
    config, folder = None, path if path.is_dir() else path.parent
    if (folder / "config.json").is_file():
        config = read_json(folder / "config.json")
    if path.is_dir():
        raw = read_folder_weights(path)
        meta = {}
    else:
        raw, meta = read_weights(path)
    found = convert.detect_format(raw)
    fmt = fmt or found
    if fmt is None:
        raise CheckpointError(f"{name}: cannot tell the checkpoint's layout from its keys ({', '.join(list(raw)[:4])}, "
                              "...); vitkit reads timm, Hugging Face, Google npz and torchvision ViTs — pass "
                              "fmt= (CLI: --from, or --init-format in train: timm|hf|npz|torchvision) if it is one of "
                              "them")
    state, hints = _convert(fmt, raw, name, config if fmt == "hf" else None)
    if fmt == "timm":
        if config and ("architecture" in config or "pretrained_cfg" in config):
            extra, pcfg = _timm_hub_hints(config)
            hints.update(extra)
        else:
            pcfg = _timm_preprocessing(raw)
    elif fmt == "hf":
        pcfg = _hf_preprocessing(folder, config or {})
    elif fmt == "torchvision":  # torchvision's V1 weights: resize 256 bilinear, crop 224, ImageNet statistics
        pcfg = _preprocessing(IMAGENET_MEAN, IMAGENET_STD, "bilinear", 0.875)
    else:  # Google's ViTs see [-1, 1] inputs, resized without a crop
        pcfg = _preprocessing(HALF, HALF, "bilinear", 1.0)
    if meta.get("format") == "vitkit":  # a vitkit file read as plain weights keeps its preprocessing and heads
        pcfg = Preprocessing.from_dict({**pcfg.to_dict(), **json.loads(meta.get("pretrained_cfg", "{}"))})
        hints.setdefault("num_heads", json.loads(meta.get("config", "{}")).get("num_heads"))
    return Source(state=state, fmt=fmt, name=name, hints=hints, preprocessing=pcfg)


def build_from_source(src: Source, model: Optional[str] = None, num_heads: Optional[int] = None) -> VisionTransformer:
    """The model a converted checkpoint describes, with its weights loaded (strict) and its preprocessing."""
    cfg = infer_config(src.state, model=model, num_heads=num_heads, hints=src.hints, source=src.name)
    cls = VisionTransformerDistilled if src.hints.get("distilled") else VisionTransformer
    try:
        net = cls(cfg)
    except ValueError as e:
        raise CheckpointError(f"{src.name}: the inferred architecture is not valid ({e})") from None
    load_state_dict_checked(net, src.state, source=src.name)
    pre, c = src.preprocessing, cfg.in_chans
    h, w = net.patch_embed.img_size
    # e.g. a 1-channel model: the first statistic per channel
    mean, std = ((v if len(v) == c else (tuple(v) * c)[:c]) for v in (pre.mean, pre.std))
    net.pretrained_cfg = replace(pre, mean=mean, std=std, input_size=(c, int(h), int(w)),
                                 extra={**pre.extra, "source_format": src.fmt}).to_dict()
    return net.eval()


def resolve(path_or_name) -> Path:
    """A local path, downloading hub names (`timm/...`, `google/vit-...`, `hf-hub:...`) when they are not files."""
    path = Path(str(path_or_name)).expanduser()
    if path.exists():
        return path
    if looks_like_hub_name(str(path_or_name)):
        return download_from_hub(str(path_or_name))
    raise CheckpointError(f"checkpoint {str(path_or_name)!r} does not exist; check the path")


def load_pretrained(path_or_name, *, fmt: Optional[str] = None, model: Optional[str] = None,
                    num_heads: Optional[int] = None, img_size=None, patch_size=None,
                    num_classes: Optional[int] = None, global_pool: Optional[str] = None) -> VisionTransformer:
    """Weights from any supported checkpoint → a ready model in eval mode, resampled to `img_size`/`patch_size` and
    with a new head when `num_classes` differs; `model.pretrained_cfg` holds the checkpoint's preprocessing.

    `fmt` forces a format ('vitkit', 'timm', 'hf', 'npz', 'torchvision'); `model` (a registered name) or
    `num_heads` supply the head count when the checkpoint does not record it."""
    if fmt is not None and fmt not in convert.FORMATS:
        raise CheckpointError(f"unknown format {fmt!r}; choose one of {', '.join(convert.FORMATS)}")
    from ..models.config import ViTConfig

    ViTConfig.check_fields({k: x for k, x in (("num_heads", num_heads), ("img_size", img_size),
                                              ("patch_size", patch_size), ("num_classes", num_classes),
                                              ("global_pool", global_pool)) if x is not None})
    if model is not None and model not in list_models():
        get_config(model)  # raises with a did-you-mean
    path = resolve(path_or_name)
    if fmt in (None, "vitkit") and (path.is_dir() and any((path / n).is_file() for n in
                                    ("best.safetensors", "last.safetensors")) or is_vitkit_checkpoint(path)
                                    or path.is_dir() and is_vitkit_checkpoint(path / "model.safetensors")):
        net = load_vit(path, "loading weights into a ViT (--init, export)")  # an MAE: the encoder, decoder dropped
    elif fmt == "vitkit":
        raise CheckpointError(f"{str(path)!r} is not a vitkit checkpoint (no vitkit metadata); drop --from vitkit "
                              "(--init-format vitkit in train) to detect its format")
    else:
        net = build_from_source(read_source(path, fmt), model=model, num_heads=num_heads)
    return adapt_model(net, img_size=img_size, patch_size=patch_size, num_classes=num_classes,
                       global_pool=global_pool)
