"""vitkit: Vision Transformers in plain PyTorch, exact to timm, with the tools around them."""
import os as _os

# OpenMP threads that spin while waiting steal the cores of a machine shared with other work: a training step
# measured up to 30x slower, and erratic, on 2 busy cores (0.1 s → 1-3.5 s), which also misleads the planner's
# step measurements. Passive waiting costs little on an idle machine. Read when torch loads OpenMP, so it applies
# only if vitkit is imported before torch; set OMP_WAIT_POLICY yourself to choose otherwise.
_os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
from .errors import CheckpointError, ConfigError, DataError, VitkitError
from .io import export, load, load_pretrained, save
from .models import ViTConfig, VisionTransformer, count_flops, create_model, list_models
from .models.dit import DiT, DiTConfig  # class-conditional diffusion transformer (image generation)
from .models.fast import OptimizedViT, optimize  # the fastest exact inference path (oneDNN or compile)
from .models.mae import MAEConfig, MaskedAutoencoderViT  # masked-autoencoder pretraining
from .models.tome import apply_tome, remove_tome  # token merging (ToMe)
from .tasks.retrieve import Index  # faiss index with a manifest that records the model

__version__ = "0.1.0"

__all__ = [
    "VisionTransformer", "ViTConfig", "create_model", "list_models", "count_flops", "save", "load",
    "load_pretrained", "export", "optimize", "OptimizedViT", "apply_tome", "remove_tome", "Index",
    "MaskedAutoencoderViT", "MAEConfig", "DiT", "DiTConfig",
    "VitkitError", "ConfigError", "DataError", "CheckpointError", "__version__",
]
