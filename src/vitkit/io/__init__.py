"""Checkpoints in and out: vitkit's own safetensors format, converters from timm/HF/npz/torchvision, and export."""
from .checkpoint import load, load_state_dict_checked, read_metadata, register_model_type, save
from .pretrained import adapt_model, load_pretrained

__all__ = ["save", "load", "read_metadata", "load_state_dict_checked", "register_model_type", "load_pretrained", "adapt_model"]
from .export import export  # noqa: E402
from .infer import infer_config  # noqa: E402

__all__ += ["export", "infer_config"]
