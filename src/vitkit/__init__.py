"""vitkit: Vision Transformers in plain PyTorch, exact to timm, with the tools around them."""
import os as _os

# How PyTorch's OpenMP threads wait between parallel regions. A training step runs hundreds of small kernels; with
# passive waiting every one pays a sleep and a wake-up, with a short spin (GOMP_SPINCOUNT 10,000: some 100 us by
# libgomp's reckoning of 100,000 spins a millisecond) the threads are still awake for the next one. The 64x4
# CIFAR model's eager training step on 2 cores of an AMX Xeon: 1.25x passive when idle, 1.42x with both cores busy
# with other work; batch-1 inference 3-6% faster than with the 3,000 spin of stops 27-33, which slept between
# kernels (benchmarks/omp_wait.py; docs/speed.md). Long spins (libgomp's default 300,000, or OMP_WAIT_POLICY=ACTIVE)
# steal the cores of a busy machine: a step up to 30x slower and erratic, which also misleads the planner's step
# measurements. Read when torch loads OpenMP, so it applies only if vitkit is imported
# before torch; set OMP_WAIT_POLICY or GOMP_SPINCOUNT yourself to choose otherwise (GOMP_SPINCOUNT wins where both
# are set; KMP_BLOCKTIME is the same setting for Intel's OpenMP, in milliseconds).
if "OMP_WAIT_POLICY" not in _os.environ:
    _os.environ.setdefault("GOMP_SPINCOUNT", "10000")
    _os.environ.setdefault("KMP_BLOCKTIME", "1")
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
