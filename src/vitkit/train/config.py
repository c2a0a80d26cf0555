"""The engine's configuration: `TrainConfig` (every option of a run that is not the task's), durations like `1h30m`,
and which options a resume may change (`RESUMABLE`, `refuse_on_resume`)."""
from __future__ import annotations

import re
from dataclasses import asdict, dataclass, fields
from typing import Mapping, Optional, Tuple

from ..errors import ConfigError
from ..runtime import check_device

DEFAULT_EPOCHS = 10  # the engine's schedule when a TrainConfig sets neither epochs nor time_budget
# What `--resume` may change (applied, and recorded in config.json's history); every other option is the run's own.
RESUMABLE = ("epochs", "time_budget", "max_steps", "eval_every", "save_every", "workers", "device", "quiet")


@dataclass
class TrainConfig:
    """Everything the engine needs; task options (model, data, loss) travel separately in `resolved`."""

    name: str = "run"
    runs_dir: str = "runs"
    overwrite: bool = False  # replace an existing run folder of the same name
    resume: Optional[str] = None  # a run folder to continue
    epochs: Optional[int] = None  # the schedule length, unless time_budget is set (neither: DEFAULT_EPOCHS)
    time_budget: Optional[float] = None  # seconds: lay the schedule over this wall-clock time instead of epochs
    max_steps: Optional[int] = None  # stop after this many optimizer steps (quick runs; the schedule is not cut)
    batch_size: int = 128  # global batch per micro-step (split over processes); effective = × accum_steps
    accum_steps: int = 1
    lr: float = 1e-3
    min_lr: float = 1e-5
    weight_decay: float = 0.05
    betas: Tuple[float, float] = (0.9, 0.999)
    warmup: float = 0.05  # warm-up length: a fraction (< 1) of all steps, or a number of epochs (>= 1)
    clip_grad: Optional[float] = 1.0  # max global grad norm; None or 0 → no clipping
    precision: str = "fp32"  # fp32 | bf16 | fp16 (autocast; fp16 adds a GradScaler)
    ema_decay: float = 0.0  # 0 → no EMA; else the EMA weights are evaluated and saved
    layer_decay: Optional[float] = None  # layer-wise lr decay (fine-tuning), e.g. 0.75
    compile: bool = False
    strategy: str = "ddp"  # how several processes train: ddp (a full replica each) | fsdp (FSDP2: weights, grads
    # and optimizer state sharded per transformer block; sharded torch.distributed.checkpoint state)
    seed: int = 0
    eval_every: Optional[int] = None  # evaluate every N epochs and at the end (a checkpoint every epoch); None:
    # every epoch, or under a time budget as often as keeps evaluation near EVAL_SHARE of the training time
    save_every: Optional[int] = None  # also checkpoint every N steps inside an epoch (with the data position, so
    # a resume continues mid-epoch with exactly the batches the interrupted epoch had left); None: epoch ends only
    device: str = "auto"  # auto | cpu | cuda | cuda:N | mps
    workers: int = 0  # DataLoader workers for file-based data
    streams: Optional[int] = None  # shards (wds:): the global batch takes an equal part from each of this many
    # shard streams, so every process count that divides it trains on the same batches; None: processes × workers
    # of the first launch (recorded in config.json, so a resume reads the same streams)
    quiet: bool = False  # no progress bar
    best_metric: str = "top1"  # picks best.safetensors; "" → no selection (best = last), for when the
    best_mode: str = "max"  # max | min      evaluation set is the test set and must not choose the checkpoint

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        """Each field's type and range: a one-line ConfigError that names the field (the CLI names its flag)."""
        from .. import validate as v

        if not isinstance(self.name, str) or not self.name.strip() or "/" in self.name or "\\" in self.name \
                or self.name in (".", "..") or len(self.name.encode()) > 255:
            raise ConfigError(f"name must be a plain folder name (not empty, no '/', at most 255 bytes), got "
                              f"{self.name[:40]!r}{'...' if len(self.name) > 40 else ''}",
                              field="name")
        v.integer(self.epochs, "epochs", lo=1, optional=True)
        v.number(self.time_budget, "time_budget", lo=0, lo_open=True, optional=True)
        v.integer(self.max_steps, "max_steps", lo=1, optional=True)
        v.integer(self.batch_size, "batch_size", lo=1)
        v.integer(self.accum_steps, "accum_steps", lo=1)
        v.number(self.lr, "lr", lo=0, lo_open=True)
        for k in ("min_lr", "weight_decay", "warmup"):
            v.number(getattr(self, k), k, lo=0)
        v.number(self.clip_grad, "clip_grad", lo=0, optional=True)
        v.choice(self.precision, "precision", ("fp32", "bf16", "fp16"))
        v.choice(self.strategy, "strategy", ("ddp", "fsdp"))
        if self.strategy == "fsdp" and self.precision == "fp16":
            raise ConfigError("--precision fp16 needs a loss scaler that agrees across shards, which --strategy fsdp "
                              "does not have; use --precision bf16 (or fp32) with fsdp", field="precision")
        v.number(self.ema_decay, "ema_decay", lo=0, hi=1, hi_open=True)
        v.number(self.layer_decay, "layer_decay", lo=0, hi=1, lo_open=True, optional=True)
        v.integer(self.seed, "seed", lo=0, hi=2**32 - 1)
        v.integer(self.eval_every, "eval_every", lo=1, optional=True)
        v.integer(self.save_every, "save_every", lo=1, optional=True)
        v.integer(self.workers, "workers", lo=0)
        v.integer(self.streams, "streams", lo=1, optional=True)
        v.choice(self.best_mode, "best_mode", ("max", "min"))
        check_device(self.device)
        if len(tuple(self.betas)) != 2:
            raise ConfigError(f"betas must be two numbers, got {self.betas!r}", field="betas")
        for b in self.betas:
            v.number(b, "betas", lo=0, hi=1, hi_open=True)

    def to_dict(self) -> dict:
        d = asdict(self)
        d["betas"] = list(d["betas"])
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "TrainConfig":
        known = {f.name for f in fields(cls)}
        d = {k: v for k, v in d.items() if k in known}
        if "betas" in d:
            d["betas"] = tuple(d["betas"])
        return cls(**d)


def parse_duration(s) -> float:
    """'90s', '10m', '1.5h', '1h30m' or plain seconds → seconds."""
    if s is None:
        return None
    if isinstance(s, (int, float)):
        return float(s)
    text = str(s).strip().lower()
    try:
        return float(text)
    except ValueError:
        pass
    parts = re.findall(r"(\d+(?:\.\d+)?)\s*(h|m|min|s|sec)", text)
    if not parts or "".join(a + b for a, b in parts) != text.replace(" ", ""):
        raise ConfigError(f"cannot read the duration {s!r}; write it like 90s, 10m, 1.5h or 1h30m")
    mult = {"h": 3600, "m": 60, "min": 60, "s": 1, "sec": 1}
    return float(sum(float(a) * mult[b] for a, b in parts))


def parse_budget(s) -> Optional[float]:
    """A time budget in seconds (`parse_duration`); None when not given, or given as 'none', 'off' or '0' (epochs)."""
    if s is None or str(s).lower() in ("0", "none", "off"):
        return None
    return parse_duration(s)


def train_config_from_flags(flags: Mapping, recipe: Optional[Mapping] = None, name: str = "run",
                            skip=()) -> TrainConfig:
    """A TrainConfig from the options given (`flags`: TrainConfig fields, None = not given), else the task's
    `recipe`, else the engine's defaults; `skip` fields are left to the task. A resumed run keeps its own values."""
    recipe = dict(recipe or {}) if not flags.get("resume") else {}  # resume_configs restores them
    if flags.get("resume") and flags.get("time_budget") is not None and parse_budget(flags["time_budget"]) is None \
            and flags.get("epochs") is None:  # None would read as "not given" and the run would keep its budget
        raise ConfigError(f"--time-budget {flags['time_budget']} with --resume: a resumed run drops its budget only "
                          "for an epoch count; add --epochs N (the total to train to)")
    if flags.get("epochs") is not None and flags.get("time_budget") is None:
        recipe.pop("time_budget", None)
    if flags.get("time_budget") is not None:
        recipe["time_budget"] = parse_budget(flags["time_budget"])
    out = {}
    for f in fields(TrainConfig):
        flag = flags.get(f.name)
        if f.name in skip:
            continue
        if flag is not None and f.name not in ("name", "time_budget") and (f.name, flag) != ("precision", "auto"):
            out[f.name] = flag  # a 0 given is checked, not read as "unset"
        elif f.name in recipe:
            out[f.name] = recipe[f.name]
    return TrainConfig(**out, name=flags.get("name") or name)


_FLAGS = {"ema_decay": "--ema", "drop_path_rate": "--drop-path", "patch_drop_rate": "--patch-drop",
          "tta_flip": "--tta", "model_args": "--model-arg", "class_dropout_prob": "--class-dropout",
          "decoder_embed_dim": "--decoder-dim", "decoder_depth": "--decoder-depth",
          "decoder_num_heads": "--decoder-heads"}


def flag_name(field_name: str) -> str:
    """The command-line flag of a config field (`lr` → `--lr`, `ema_decay` → `--ema`)."""
    return _FLAGS.get(field_name, "--" + field_name.replace("_", "-"))


def refuse_on_resume(path, names) -> None:
    """The one-line error for options that cannot change when a run resumes (`names`: flags or field names)."""
    names = sorted({n if n.startswith("--") else flag_name(n) for n in names})
    if names:
        raise ConfigError(f"--resume {path}: {', '.join(names)} cannot change when a run resumes (it goes on with "
                          "the options it was started with; only --epochs, --time-budget, --max-steps, "
                          "--eval-every, --save-every, --workers and --device can); drop them, or start a new run")
