"""The ViT family: the model, its named configs, and the resampling helpers for any image size."""
from .config import ViTConfig, count_flops, count_params, get_config, list_models, register
from .layers import resample_abs_pos_embed, resample_patch_embed
from .preprocessing import Preprocessing, denormalize, normalize
from .registry import MODEL_TYPES, model_type_of, register_model_type
from .vit import Attention, Block, DropPath, LayerScale, Mlp, PatchEmbed, VisionTransformer


def create_model(name: str = "", config: ViTConfig | None = None, **overrides) -> VisionTransformer:
    """Build a ViT from a registered config name (`list_models()`), or from a `ViTConfig`, with overrides
    (`num_classes=10`, `img_size=384`, `drop_path_rate=0.1`, ...)."""
    if config is None:
        config = get_config(name) if name else ViTConfig()
    return VisionTransformer(config, **overrides)


__all__ = [
    "ViTConfig", "VisionTransformer", "PatchEmbed", "Attention", "Mlp", "LayerScale", "DropPath", "Block",
    "create_model", "list_models", "get_config", "register", "count_flops", "count_params",
    "resample_abs_pos_embed", "resample_patch_embed", "Preprocessing", "normalize", "denormalize",
    "MODEL_TYPES", "model_type_of", "register_model_type",
]
