"""The ViT family: the model, its named configs, and the resampling helpers for any image size."""
from .config import ViTConfig, count_flops, count_params, get_config, list_models, model_table, register
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


def summarize(name: str, img_size: int | None = None, num_classes: int | None = None):
    """Build the registered model `name` (with `img_size` / `num_classes` overrides) and run one blank image
    through it: (model, info) where info has its params, tokens, GFLOPs, input and output shapes."""
    import torch

    overrides = {k: v for k, v in (("img_size", img_size), ("num_classes", num_classes)) if v is not None}
    model = create_model(name, **overrides).eval()
    cfg = model.config
    x = torch.zeros(1, cfg.in_chans, *cfg.grid_size).repeat_interleave(cfg.patch_size, 2).repeat_interleave(
        cfg.patch_size, 3)
    with torch.no_grad():
        out = model(x)
    cost = count_flops(cfg)
    info = {"model": name, "params": sum(p.numel() for p in model.parameters()), "tokens": cost["tokens"],
            "GFLOPs": round(cost["flops"] / 1e9, 3), "input": list(x.shape), "output": list(out.shape)}
    return model, info


__all__ = [
    "ViTConfig", "VisionTransformer", "PatchEmbed", "Attention", "Mlp", "LayerScale", "DropPath", "Block",
    "create_model", "summarize", "model_table", "list_models", "get_config", "register", "count_flops", "count_params",
    "resample_abs_pos_embed", "resample_patch_embed", "Preprocessing", "normalize", "denormalize",
    "MODEL_TYPES", "model_type_of", "register_model_type",
]
