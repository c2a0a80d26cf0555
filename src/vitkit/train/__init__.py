"""Training: one engine (`Trainer` + `TrainConfig`) for every model vitkit trains; see `engine` for the API."""
from .engine import (EMA, DistInfo, RunDir, Trainer, TrainConfig, TrainingDiverged, parse_duration, read_metrics,
                     resolve_device, resume_configs, setup_distributed)
from .optim import build_optimizer, lr_at, param_groups, set_lr

__all__ = [
    "Trainer", "TrainConfig", "TrainingDiverged", "RunDir", "EMA", "DistInfo", "setup_distributed",
    "resolve_device", "resume_configs", "parse_duration", "read_metrics", "build_optimizer", "param_groups", "lr_at", "set_lr",
]
