"""Training: one engine (`Trainer` + `TrainConfig`) for every model vitkit trains; see `engine` for the API."""
from .engine import (EMA, RESUMABLE, DistInfo, RunDir, Trainer, TrainConfig, TrainingDiverged, claim_run,
                     parse_duration, read_metrics, refuse_on_resume, resolve_device, resume_configs, setup_distributed)
from .optim import build_optimizer, lr_at, param_groups, set_lr

__all__ = [
    "Trainer", "TrainConfig", "TrainingDiverged", "RunDir", "EMA", "DistInfo", "setup_distributed",
    "resolve_device", "resume_configs", "claim_run", "refuse_on_resume", "RESUMABLE", "parse_duration",
    "read_metrics", "build_optimizer", "param_groups", "lr_at", "set_lr",
]
from .evaluation import eval_batches, mean_over_batches  # noqa: E402

__all__ += ["eval_batches", "mean_over_batches"]
