"""The model types a vitkit checkpoint can hold: name (its `model_type` metadata) → (config class, model class).

One table for every family, so a checkpoint rebuilds its own model whatever module is imported first. A model of
another family joins with `register_model_type` (its class needs a `.config` with `to_dict`/`from_dict`).
"""
from __future__ import annotations

from typing import Dict, Optional, Tuple, Type

from torch import nn

from .config import ViTConfig
from .deit import VisionTransformerDistilled
from .dit import DiT, DiTConfig
from .mae import MAEConfig, MaskedAutoencoderViT
from .vit import VisionTransformer

MODEL_TYPES: Dict[str, Tuple[type, Type[nn.Module]]] = {
    "vit": (ViTConfig, VisionTransformer),
    "vit_distilled": (ViTConfig, VisionTransformerDistilled),
    "mae": (MAEConfig, MaskedAutoencoderViT),
    "dit": (DiTConfig, DiT),
}


def register_model_type(name: str, config_cls: type, model_cls: Type[nn.Module]) -> None:
    """Make `vitkit.save`/`vitkit.load` handle `model_cls` models (built as model_cls(config_cls.from_dict(d)))."""
    MODEL_TYPES[name] = (config_cls, model_cls)


def model_type_of(model: nn.Module) -> Optional[str]:
    """The registered name of the model's exact class (a subclass is another model), or None."""
    for name, (_, cls) in MODEL_TYPES.items():
        if type(model) is cls:
            return name
    return None


__all__ = ["MODEL_TYPES", "register_model_type", "model_type_of"]
