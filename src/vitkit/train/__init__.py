"""Training: one engine (`Trainer` + `TrainConfig`) for every model vitkit trains; see `engine` for the API.

config (TrainConfig, durations, what a resume may change) · rundir (the run folder: claim, read, write, resume
configs) · engine (the loop) · evaluation (the held-out loop) · budget (the time-budget planner) · distributed ·
sharded (FSDP2 and sharded checkpoints) · ema · optim · probe."""
from ..runtime import resolve_device  # here too for compatibility: its home is vitkit.runtime
from .config import RESUMABLE, TrainConfig, parse_budget, parse_duration, refuse_on_resume, train_config_from_flags
from .distributed import DistInfo, setup_distributed
from .ema import EMA
from .engine import Trainer, TrainingDiverged
from .evaluation import eval_batches, mean_over_batches
from .optim import build_optimizer, lr_at, param_groups, set_lr
from .rundir import RunDir, claim_run, elastic_resume, read_config, read_metrics, resume_configs

__all__ = [
    "Trainer", "TrainConfig", "TrainingDiverged", "RunDir", "EMA", "DistInfo", "setup_distributed",
    "resolve_device", "resume_configs", "claim_run", "refuse_on_resume", "RESUMABLE", "parse_duration",
    "parse_budget", "train_config_from_flags", "elastic_resume",
    "read_metrics", "read_config", "build_optimizer", "param_groups", "lr_at", "set_lr", "eval_batches",
    "mean_over_batches",
]
