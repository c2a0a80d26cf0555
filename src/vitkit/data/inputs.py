"""Images as a model's input: image files in, model-ready tensors out, for the tasks that run a trained model on a
user's own images (retrieve, explain). Reading and preprocessing are this folder's (`read_image`, `eval_transform`,
as `vitkit predict` uses them), with the checkpoint's own settings (`Preprocessing.of(model)`: input size,
mean/std, interpolation, crop_pct).
"""
from __future__ import annotations

from pathlib import Path
from typing import Optional, Sequence, Tuple, Union

import torch

from ..errors import DataError
from ..models import Preprocessing
from ..models import denormalize as _denormalize
from .images import read_image
from .transforms import eval_transform


def label_of(path: Path, root: Path) -> Optional[str]:
    """The class of an image in an ImageFolder-style tree (its first sub-folder under `root`), else None."""
    parts = Path(path).relative_to(root).parts
    return parts[0] if len(parts) > 1 else None


def open_image(path, channels: int = 3):
    """A PIL image in the model's channel mode ('L' for 1 channel, 'RGB' for 3) by vitkit.data's one reading
    policy, or a DataError naming the file."""
    return read_image(path, channels)


def preprocessing(model) -> dict:
    """The checkpoint's preprocessing with the defaults filled in, as its dict (`Preprocessing.of(model).to_dict()`)."""
    return Preprocessing.of(model).to_dict()


def native_size(image, patch: int) -> Tuple[int, int]:
    """The image's own size rounded down to a multiple of the patch (for `--size native`)."""
    w, h = image.size
    if h < patch or w < patch:
        raise DataError(f"image of {w}x{h} pixels is smaller than one {patch}x{patch} patch, so the model cannot "
                        "take it at its own size; use the model's input size instead")
    return (h // patch) * patch, (w // patch) * patch


def load_batch(paths: Sequence, model, size: Optional[Tuple[int, int]] = None) -> torch.Tensor:
    """Image files → one (B, C, H, W) batch preprocessed for `model`; `size` overrides its input size."""
    tf = eval_transform(Preprocessing.of(model), size)
    return torch.stack([tf(open_image(p, model.config.in_chans)) for p in paths])


def denormalize(x: torch.Tensor, pre: Union[Preprocessing, dict]):
    """A preprocessed (C, H, W) tensor back to an (H, W, C) float array in [0, 1] for plotting; `pre` is a
    Preprocessing or its dict (`preprocessing(model)`)."""
    pre = pre if isinstance(pre, Preprocessing) else Preprocessing.from_dict(pre)
    return _denormalize(x.detach().cpu(), pre).clamp(0, 1).permute(1, 2, 0).numpy()
