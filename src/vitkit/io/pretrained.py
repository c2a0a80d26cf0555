"""Load weights from wherever they come from into vitkit's ViT, adapting size, patch and head on the way.

This is the single entry point for starting from pretrained weights (`vitkit train --init`).
"""
from __future__ import annotations

from pathlib import Path
from typing import Optional

from ..errors import CheckpointError
from ..models import VisionTransformer
from .checkpoint import is_vitkit_checkpoint, load


def adapt_model(model: VisionTransformer, img_size=None, patch_size=None, num_classes: Optional[int] = None,
                global_pool: Optional[str] = None) -> VisionTransformer:
    """Resample a loaded model to a new image/patch size and give it a fresh head for `num_classes`."""
    if img_size is not None or patch_size is not None:
        model.set_input_size(img_size=img_size, patch_size=patch_size)
    if num_classes is not None and (num_classes != model.num_classes or global_pool is not None):
        model.reset_classifier(num_classes, global_pool=global_pool)
        pcfg = getattr(model, "pretrained_cfg", None)
        if pcfg:
            pcfg["class_names"] = None
    return model


def load_pretrained(path_or_name, *, fmt: Optional[str] = None, model: Optional[str] = None,
                    num_heads: Optional[int] = None, img_size=None, patch_size=None,
                    num_classes: Optional[int] = None, global_pool: Optional[str] = None) -> VisionTransformer:
    """Weights from a vitkit checkpoint (or run folder) → a ready model, resampled to `img_size`/`patch_size`
    and with a new head when `num_classes` differs. Other formats (timm, HF, npz, torchvision) convert here too."""
    path = Path(path_or_name)
    if fmt in (None, "vitkit") and (path.is_dir() and any((path / n).is_file() for n in
                                    ("best.safetensors", "last.safetensors", "model.safetensors"))
                                    or is_vitkit_checkpoint(path)):
        net = load(path)
        if hasattr(net, "to_encoder"):  # an MAE checkpoint: the encoder becomes the classifier, the decoder is dropped
            net = net.to_encoder()
    elif not path.exists():
        raise CheckpointError(f"checkpoint {str(path_or_name)!r} does not exist; check the path")
    else:
        raise CheckpointError(f"{str(path)!r} is not a vitkit checkpoint, and this build has no converter for it")
    return adapt_model(net, img_size=img_size, patch_size=patch_size, num_classes=num_classes,
                       global_pool=global_pool)

