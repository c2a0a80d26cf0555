"""Image files in, model-ready tensors out, for the tasks that run a trained model on a user's own images
(retrieve, explain). Reading and preprocessing are `vitkit.data`'s (`read_image`, `eval_transform`, as
`vitkit predict` uses them), with the checkpoint's own settings (`model.pretrained_cfg`: input size, mean/std,
interpolation, crop_pct).
"""
from __future__ import annotations

from pathlib import Path
from typing import List, Optional, Sequence, Tuple

import torch

from ..data import IMG_EXTENSIONS as IMAGE_EXTENSIONS
from ..data import eval_transform as _eval_transform
from ..data import read_image
from ..errors import DataError


def list_images(folder) -> List[Path]:
    """Every image file under `folder` (recursive, by extension, sorted), or a clear error for none."""
    folder = Path(folder)
    if not folder.exists():
        raise DataError(f"folder {str(folder)!r} does not exist; check the path")
    if not folder.is_dir():
        raise DataError(f"{str(folder)!r} is a file, not a folder of images; pass the folder that holds the images")
    files = sorted(p for p in folder.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS
                   and not any(part.startswith(".") for part in p.relative_to(folder).parts))
    if not files:
        raise DataError(f"folder {str(folder)!r} holds no images (looked for {', '.join(IMAGE_EXTENSIONS)} "
                        "files, recursively); put images in it or point at another folder")
    return files


def label_of(path: Path, root: Path) -> Optional[str]:
    """The class of an image in an ImageFolder-style tree (its first sub-folder under `root`), else None."""
    parts = Path(path).relative_to(root).parts
    return parts[0] if len(parts) > 1 else None


def open_image(path, channels: int = 3):
    """A PIL image in the model's channel mode ('L' for 1 channel, 'RGB' for 3) by vitkit.data's one reading
    policy, or a DataError naming the file."""
    return read_image(path, channels)


def preprocessing(model) -> dict:
    """The checkpoint's preprocessing, with defaults for a model that carries none."""
    cfg = model.config
    size = cfg.img_size if isinstance(cfg.img_size, (tuple, list)) else (cfg.img_size, cfg.img_size)
    pcfg = {"mean": [0.5] * cfg.in_chans, "std": [0.5] * cfg.in_chans, "interpolation": "bicubic", "crop_pct": 1.0,
            "input_size": [cfg.in_chans, int(size[0]), int(size[1])]}
    pcfg.update({k: v for k, v in (getattr(model, "pretrained_cfg", None) or {}).items() if v is not None})
    return pcfg


def eval_transform(pcfg: dict, size: Optional[Tuple[int, int]] = None):
    """PIL image → normalised tensor (C, H, W), by the checkpoint's preprocessing; `size` overrides its input size."""
    size = size or tuple(pcfg["input_size"][1:])
    return _eval_transform(size, pcfg["mean"], pcfg["std"], crop_pct=float(pcfg.get("crop_pct") or 1.0),
                           interpolation=pcfg.get("interpolation", "bicubic"))


def native_size(image, patch: int) -> Tuple[int, int]:
    """The image's own size rounded down to a multiple of the patch (for `--size native`)."""
    w, h = image.size
    if h < patch or w < patch:
        raise DataError(f"image of {w}x{h} pixels is smaller than one {patch}x{patch} patch, so the model cannot "
                        "take it at its own size; use the model's input size instead")
    return (h // patch) * patch, (w // patch) * patch


def load_batch(paths: Sequence, model, size: Optional[Tuple[int, int]] = None) -> torch.Tensor:
    """Image files → one (B, C, H, W) batch preprocessed for `model`."""
    pcfg = preprocessing(model)
    tf = eval_transform(pcfg, size)
    return torch.stack([tf(open_image(p, model.config.in_chans)) for p in paths])


def denormalize(x: torch.Tensor, pcfg: dict):
    """A preprocessed (C, H, W) tensor back to an (H, W, C) float array in [0, 1] for plotting."""
    mean = torch.tensor(pcfg["mean"]).view(-1, 1, 1)
    std = torch.tensor(pcfg["std"]).view(-1, 1, 1)
    return (x.detach().cpu() * std + mean).clamp(0, 1).permute(1, 2, 0).numpy()
