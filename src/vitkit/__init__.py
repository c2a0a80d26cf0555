"""vitkit: Vision Transformers in plain PyTorch, exact to timm, with the tools around them."""
from .errors import CheckpointError, ConfigError, DataError, VitkitError
from .io import load, save
from .models import ViTConfig, VisionTransformer, count_flops, create_model, list_models

__version__ = "0.1.0"

__all__ = [
    "VisionTransformer", "ViTConfig", "create_model", "list_models", "count_flops", "save", "load",
    "VitkitError", "ConfigError", "DataError", "CheckpointError", "__version__",
]

from .io import export, load_pretrained  # noqa: E402

__all__ += ["load_pretrained", "export"]

# Retrieval and attention maps (issue 4): the faiss index with its manifest; vitkit.tasks.explain for the maps.
from .tasks.retrieve import Index  # noqa: E402

__all__ += ["Index"]

# Generative models: MAE pretraining and the class-conditional diffusion transformer.
from .models.dit import DiT, DiTConfig  # noqa: E402
from .models.mae import MAEConfig, MaskedAutoencoderViT  # noqa: E402

__all__ += ["MaskedAutoencoderViT", "MAEConfig", "DiT", "DiTConfig"]
