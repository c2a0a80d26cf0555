"""vitkit: Vision Transformers in plain PyTorch, exact to timm, with the tools around them."""
from .errors import CheckpointError, ConfigError, DataError, VitkitError
from .io import load, save
from .models import ViTConfig, VisionTransformer, count_flops, create_model, list_models

__version__ = "0.1.0"

__all__ = [
    "VisionTransformer", "ViTConfig", "create_model", "list_models", "count_flops", "save", "load",
    "VitkitError", "ConfigError", "DataError", "CheckpointError", "__version__",
]

# Speed (issue 5): the fast exact inference path and token merging.
from .models.fast import OptimizedViT, optimize  # noqa: E402
from .models.tome import apply_tome, remove_tome  # noqa: E402

__all__ += ["optimize", "OptimizedViT", "apply_tome", "remove_tome"]
