"""The training engine: one loop for every model vitkit trains (classifier, MAE, DiT).

A task brings the model, the data and two functions; the engine owns everything else — run folder, optimizer,
schedule (epochs or a wall-clock budget), precision, accumulation, clipping, EMA, distributed, checkpoints,
resume, metrics, progress bar and the NaN guard:

    cfg = TrainConfig(name="mnist", epochs=10, lr=1e-3)
    def loss_fn(model, batch):                 # batch = what the loader yields, already on the device
        x, y = batch
        loss = F.cross_entropy(model(x), y)
        return loss, {"acc": ...}               # extra metrics are averaged over the epoch as train_<name>
    def eval_fn(model):                        # rank 0, model in eval mode, under no_grad/autocast
        return {"val_loss": ..., "top1": ...}   # `cfg.best_metric` picks the best checkpoint
    trainer = Trainer(model, train_data, cfg, loss_fn, eval_fn=eval_fn, resolved={"data": ...})
    summary = trainer.fit()                    # → runs/mnist/{config.json, metrics.csv, last.*, best.*, report.*}

`train_data` is a dataset for `vitkit.data.make_loader` (anything with `len()`; in-memory tensors are fastest)
or a callable `(epoch, rank, world) -> iterable of batches` for data the task batches itself. The model must be
savable by `vitkit.save` (its class registered with `vitkit.io.register_model_type`, a `.config` with
`to_dict()`); `model.pretrained_cfg` (class names, preprocessing) travels into every checkpoint.

Run folder files: `config.json` (everything resolved, enough to repeat the run), `metrics.csv` (one row per
epoch; held-out columns on evaluated epochs), `last.safetensors` / `best.safetensors` (weights — the EMA weights when EMA is on — through
`vitkit.save`), `last.state.pt` (training state: raw weights, optimizer, scaler, EMA, RNG, step, epoch, the
time-budget plan; plain tensors and dicts for `torch.load(weights_only=True)`), `report.json`, `report.md`.
Every file is written atomically, so a kill at any moment leaves the last good checkpoint. Checkpoints are taken
at epoch ends; `resume` continues from the last one and, on the CPU, ends bit-identical to an uninterrupted run.
`.lock` holds the pid of the process that owns the folder, under an OS lock (`claim_run`). A resume may change only
RESUMABLE fields; a new `epochs`/`time_budget` lays the cosine over the new total from the current step (so a
finished run trains on), and `config.json`'s `history` records each resume.
"""
from __future__ import annotations

import copy
import csv
import io
import json
import logging
import math
import os
import shutil
import time
from contextlib import contextmanager, nullcontext
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Tuple

import torch
from torch import nn

from ..errors import ConfigError, RunExistsError, VitkitError
from ..io.checkpoint import atomic_write
from .optim import build_optimizer, lr_at, set_lr

try:
    import fcntl
except ImportError:  # Windows: no flock, so run folders are not locked there
    fcntl = None

log = logging.getLogger(__name__)


class TrainingDiverged(VitkitError, ValueError):
    """The loss became NaN or infinite."""


DEFAULT_EPOCHS = 10  # the engine's schedule when a TrainConfig sets neither epochs nor time_budget
EVAL_SHARE = 0.03  # under a time budget, evaluations get about this share of the training time (eval_every=None)
# What `--resume` may change (applied, and recorded in config.json's history); every other option is the run's own.
RESUMABLE = ("epochs", "time_budget", "max_steps", "eval_every", "workers", "device", "quiet")


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
    seed: int = 0
    eval_every: Optional[int] = None  # evaluate every N epochs and at the end (a checkpoint every epoch); None:
    # every epoch, or under a time budget as often as keeps evaluation near EVAL_SHARE of the training time
    device: str = "auto"  # auto | cpu | cuda | cuda:N | mps
    workers: int = 0  # DataLoader workers for file-based data
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
        v.number(self.ema_decay, "ema_decay", lo=0, hi=1, hi_open=True)
        v.number(self.layer_decay, "layer_decay", lo=0, hi=1, lo_open=True, optional=True)
        v.integer(self.seed, "seed", lo=0, hi=2**32 - 1)
        v.integer(self.eval_every, "eval_every", lo=1, optional=True)
        v.integer(self.workers, "workers", lo=0)
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
    import re

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


# ---- distributed ----------------------------------------------------------------------------------------------
@dataclass
class DistInfo:
    rank: int = 0
    world: int = 1
    local_rank: int = 0
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def check_device(name) -> str:
    """A device name vitkit understands (auto | cpu | cuda | cuda:N | mps), else a ConfigError naming `device`."""
    import re

    if not isinstance(name, str) or not re.fullmatch(r"auto|cpu|mps|cuda(:\d+)?", name):
        raise ConfigError(f"device must be auto, cpu, cuda, cuda:N or mps, got {name!r}", field="device")
    return name


def resolve_device(name: str = "auto", local_rank: int = 0) -> torch.device:
    """`auto` is $VITKIT_DEVICE where set (the test suite sets `cpu`), else this rank's GPU if any, else the CPU."""
    check_device(name)
    if name == "auto" and os.environ.get("VITKIT_DEVICE"):
        name = os.environ["VITKIT_DEVICE"]
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda", local_rank)
        return torch.device("cpu")
    dev = torch.device(name)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError("--device cuda was asked for but no CUDA GPU is visible; use --device cpu")
    if dev.type == "cuda" and dev.index is not None and dev.index >= torch.cuda.device_count():
        raise ConfigError(f"--device {name} was asked for but only {torch.cuda.device_count()} GPU(s) are visible")
    if dev.type == "mps" and not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
        raise ConfigError("--device mps was asked for but no Apple GPU is available; use --device cpu")
    return dev


def setup_distributed(device: str = "auto") -> DistInfo:
    """Join the process group torchrun describes (NCCL on GPUs, gloo on CPUs); a single process otherwise."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return DistInfo(device=resolve_device(device))
    import torch.distributed as dist

    rank, local = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    dev = resolve_device(device, local)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if dev.type == "cuda" else "gloo")
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    return DistInfo(rank, world, local, dev)


def _broadcast_obj(obj, dist_info: DistInfo):
    if dist_info.world <= 1:
        return obj
    import torch.distributed as dist

    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def _barrier(dist_info: DistInfo) -> None:
    if dist_info.world > 1:
        import torch.distributed as dist

        dist.barrier()


# ---- EMA ------------------------------------------------------------------------------------------------------
class EMA:
    """Exponential moving average of the weights; the decay warms up as min(decay, (1 + n) / (10 + n))."""

    def __init__(self, model: nn.Module, decay: float):
        self.module = copy.deepcopy(model).eval()
        for p in self.module.parameters():
            p.requires_grad_(False)
        self.decay, self.updates = decay, 0

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        self.updates += 1
        d = min(self.decay, (1 + self.updates) / (10 + self.updates))
        ema = [v for v in self.module.state_dict().values() if v.dtype.is_floating_point]
        cur = [v for v in model.state_dict().values() if v.dtype.is_floating_point]
        torch._foreach_lerp_(ema, cur, 1.0 - d)

    def state_dict(self) -> dict:
        return {"weights": self.module.state_dict(), "updates": self.updates}

    def load_state_dict(self, s: dict) -> None:
        self.module.load_state_dict(s["weights"])
        self.updates = int(s["updates"])


# ---- run folder -----------------------------------------------------------------------------------------------
LOCK_FILE = ".lock"  # in every run folder: the pid of the process that owns it, flock'ed while it runs


def _pid_in(fd: int) -> str:
    try:
        return os.pread(fd, 32, 0).decode().strip() or "?"
    except OSError:
        return "?"


def _leftovers(path: Path) -> List[str]:
    """The entries of a run folder other than its lock file."""
    return sorted(p.name for p in path.iterdir() if p.name != LOCK_FILE) if path.is_dir() else []


def _is_tmp(name: str) -> bool:
    return name.startswith(".") and name.endswith(".tmp")  # atomic_write's half-written files


def _only_unfinished(names: List[str]) -> bool:
    """What a run that died before its first checkpoint leaves: config.json (or not even that) and temp files."""
    return all(n == "config.json" or _is_tmp(n) for n in names)


class RunDir:
    """`runs/<name>/`: created fresh (refusing to overwrite unless asked), or reopened to resume; in both cases
    owned by one process at a time through an OS lock on `.lock` (flock: it dies with the process, so a killed run
    leaves no stale lock). Use through `claim_run`, which also releases it."""

    def __init__(self, path: Path, lock_fd: Optional[int] = None):
        self.path = Path(path)
        self._fd = lock_fd
        self.created = False  # this process made the folder
        self.replace = False  # old contents to delete at `start` (--overwrite, or a run that never checkpointed)
        self.started = False  # `start` ran: everything in the folder is this run's

    @staticmethod
    def _lock(path: Path, busy: str) -> Optional[int]:
        """Take `path/.lock` (making the folder); `busy` (with {pid}) is the RunExistsError if another process
        holds it. No lock where fcntl is missing (Windows): run folders are not guarded there. The owner writes its
        pid in once its checks pass (`_own`), so a refused claim leaves the file as it was."""
        if fcntl is None:
            path.mkdir(parents=True, exist_ok=True)
            return None
        for _ in range(20):
            path.mkdir(parents=True, exist_ok=True)
            lock = path / LOCK_FILE
            try:
                fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o644)
            except FileNotFoundError:  # the folder was removed under us by its previous owner: again
                continue
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                pid = _pid_in(fd)
                for _ in range(20):  # an owner that has just locked writes its pid once its checks pass
                    if pid != "?":
                        break
                    time.sleep(0.025)
                    pid = _pid_in(fd)
                os.close(fd)
                raise RunExistsError(busy.format(pid=pid)) from None
            try:  # the owner before us may have removed the folder (and this lock file) before we locked it
                same = os.stat(lock).st_ino == os.fstat(fd).st_ino
            except FileNotFoundError:
                same = False
            if same:
                return fd
            os.close(fd)
        raise RunExistsError(busy.format(pid="?"))

    @classmethod
    def create(cls, runs_dir, name: str, overwrite: bool) -> "RunDir":
        """A new run's folder, locked. An existing run is replaced only with `overwrite`, and only at `start` (so
        a run that fails before then leaves it as it was); a run that died before its first checkpoint (nothing
        but config.json) is replaced without asking; a live run, or a folder that is not a run, never."""
        path = Path(runs_dir) / name
        if path.exists() and not path.is_dir():
            raise RunExistsError(f"{str(path)!r} exists and is not a run folder; choose another --name")
        existed = path.is_dir()

        def foreign(names):
            return "config.json" not in names and not all(_is_tmp(n) for n in names)

        if foreign(_leftovers(path)):
            raise RunExistsError(f"{str(path)!r} holds files but no config.json, so it does not look like a vitkit "
                                 f"run: refusing to {'delete' if overwrite else 'use'} it; choose another --name")
        busy = (f"--overwrite refused: run {str(path)!r} is in use by process {{pid}} (still running); stop it first "
                "or choose another --name" if overwrite else
                f"run {str(path)!r} is in use by process {{pid}} (still running); wait for it to end or choose "
                "another --name")
        run = cls(path, cls._lock(path, busy))
        run.created = not existed
        names = _leftovers(path)  # again, now that no other process can change it
        try:
            if foreign(names):
                raise RunExistsError(f"{str(path)!r} holds files but no config.json, so it does not look like a "
                                     "vitkit run: refusing to delete it; choose another --name")
            if names and not overwrite and not _only_unfinished(names):
                raise RunExistsError(f"run folder {str(path)!r} exists already; pass --overwrite to replace it, "
                                     f"--resume {path} to continue it, or choose another --name")
        except BaseException:
            run.release()
            raise
        if names and not overwrite:
            log.warning("replacing %s: its run ended before its first checkpoint", path)
        run.replace = bool(names)
        run._own()
        return run

    @classmethod
    def reopen(cls, path) -> "RunDir":
        """An existing run's folder, locked, to resume it."""
        path = Path(path)
        if not path.is_dir():
            raise ConfigError(f"cannot resume {str(path)!r}: no such run folder")
        run = cls(path, cls._lock(path, f"cannot resume {str(path)!r}: process {{pid}} is running it now"))
        run._own()
        return run

    def _own(self) -> None:
        if self._fd is not None:
            os.ftruncate(self._fd, 0)
            os.pwrite(self._fd, f"{os.getpid()}\n".encode(), 0)

    def start(self) -> None:
        """Called before the run writes its first file: clear what an earlier run left here (under the lock)."""
        if self.replace:
            for p in self.path.iterdir():
                if p.name == LOCK_FILE:
                    continue
                if p.is_dir() and not p.is_symlink():
                    shutil.rmtree(p)
                else:
                    p.unlink()
            self.replace = False
        self.started = True

    def has_checkpoint(self) -> bool:
        return (self.path / "last.state.pt").is_file() or (self.path / "last.safetensors").is_file()

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)  # closing the descriptor drops the flock
            self._fd = None

    def close(self, failed: bool) -> None:
        """Release the lock; after a failure before the first checkpoint, first remove the folder if this run made
        or replaced it (it holds nothing worth keeping, and its name stays free)."""
        try:
            if failed and (self.created or self.started) and not self.has_checkpoint():
                shutil.rmtree(self.path, ignore_errors=True)
        finally:
            self.release()

    def write_json(self, name: str, obj) -> Path:
        text = json.dumps(obj, indent=2, default=str) + "\n"
        atomic_write(self.path / name, lambda tmp: Path(tmp).write_text(text))
        return self.path / name

    def write_text(self, name: str, text: str) -> Path:
        atomic_write(self.path / name, lambda tmp: Path(tmp).write_text(text))
        return self.path / name

    def write_metrics(self, rows: List[dict]) -> Path:
        keys: List[str] = []
        for r in rows:
            keys += [k for k in r if k not in keys]
        buf = io.StringIO()
        w = csv.DictWriter(buf, fieldnames=keys)
        w.writeheader()
        for r in rows:
            w.writerow({k: (f"{v:.6g}" if isinstance(v, float) else v) for k, v in r.items()})
        return self.write_text("metrics.csv", buf.getvalue())


@contextmanager
def claim_run(cfg: TrainConfig, is_main: bool = True):
    """The locked run folder of `cfg` (its `resume` folder, or `runs_dir/name`) for the life of the block; None
    on ranks other than 0. Tasks claim it before they read any data, so a name clash is reported at once. If the
    block fails before the first checkpoint, a folder this run made or replaced is removed."""
    if not is_main:
        yield None
        return
    run = RunDir.reopen(cfg.resume) if cfg.resume else RunDir.create(cfg.runs_dir, cfg.name, cfg.overwrite)
    ok = False
    try:
        yield run
        ok = True
    finally:
        run.close(failed=not ok)


def read_metrics(path) -> List[dict]:
    """metrics.csv → list of dicts with numbers parsed."""
    rows = []
    with open(path, newline="") as f:
        for r in csv.DictReader(f):
            rows.append({k: _num(v) for k, v in r.items()})
    return rows


def _num(v):
    try:
        f = float(v)
        return int(f) if f.is_integer() and "." not in v and "e" not in v.lower() else f
    except (TypeError, ValueError):
        return v


# ---- the trainer ----------------------------------------------------------------------------------------------
LossFn = Callable[[nn.Module, Any], Tuple[torch.Tensor, Dict[str, Any]]]
EvalFn = Callable[[nn.Module], Dict[str, float]]


class Trainer:
    """Fit `model` on `train_data` with `loss_fn`; evaluate with `eval_fn`; see the module docstring.

    Hooks: `end_fn(trainer, summary) -> dict` runs on rank 0 after the final evaluation (plots, task reports);
    what it returns is merged into report.json, and its 'markdown' entry is appended to report.md.
    `on_epoch_end(trainer, row)` runs on every rank after each checkpoint (tests use it to interrupt).
    `resolved` is the task's part of config.json (model, data, loss options)."""

    clock = staticmethod(time.perf_counter)  # every time the engine reads (budget, throughput); tests inject one

    def __init__(self, model: nn.Module, train_data, cfg: TrainConfig, loss_fn: LossFn, eval_fn: Optional[EvalFn]
                 = None, *, resolved: Optional[dict] = None, end_fn: Optional[Callable] = None,
                 on_epoch_end: Optional[Callable] = None, loader_kwargs: Optional[dict] = None,
                 dist_info: Optional[DistInfo] = None, time_spent: float = 0.0, reserve: float = 0.0,
                 step_cost: Optional[Callable[[float], float]] = None, run: Optional[RunDir] = None):
        cfg.validate()
        self.cfg, self.loss_fn, self.eval_fn, self.end_fn = cfg, loss_fn, eval_fn, end_fn
        self.on_epoch_end = on_epoch_end
        self.train_data, self.loader_kwargs = train_data, dict(loader_kwargs or {})
        self.resolved = dict(resolved or {})
        self.dist = dist_info or setup_distributed(cfg.device)
        self.device = self.dist.device
        self.model = model.to(self.device)
        if cfg.batch_size % self.dist.world:
            raise ConfigError(f"--batch-size {cfg.batch_size} must divide evenly over {self.dist.world} processes")
        self.history: List[dict] = []
        self.step = 0  # optimizer steps done
        self.epoch = 0  # epochs completed
        self.best: Optional[float] = None
        self.best_epoch: Optional[int] = None
        self.elapsed = 0.0  # training seconds spent before this process started (resume)
        self.plan: Dict[str, Any] = {}  # total and warm-up steps; planned from throughput under a time budget
        self.finished = False
        self.run = run  # the caller's claimed folder (claim_run), else fit claims one
        # Under a time budget that covers a whole command: seconds the caller spent before fit (scanning, planning)
        # and seconds it needs after (its final report); and the relative cost of a step at a point of the
        # schedule (progressive resizing makes late steps dearer), so the plan fits what the steps will cost.
        self.time_spent, self.reserve = float(time_spent), float(reserve)
        self.step_cost = step_cost or (lambda progress: 1.0)
        self._save_secs = 0.0  # the last checkpoint's cost: the budget keeps room for one per epoch

    # ---- set-up ---------------------------------------------------------------------------------------------
    def _loader(self, epoch: int):
        if callable(self.train_data) and not hasattr(self.train_data, "__len__"):
            return self.train_data(epoch, self.dist.rank, self.dist.world)
        from ..data import make_loader

        return make_loader(self.train_data, self.cfg.batch_size, train=True, seed=self.cfg.seed, epoch=epoch,
                           rank=self.dist.rank, world=self.dist.world, workers=self.cfg.workers,
                           start_step=self.step, total_steps=self.plan.get("total"), accum_steps=self.cfg.accum_steps,
                           **self.loader_kwargs)

    def _steps_per_epoch(self) -> int:
        n = len(self._loader(0))
        if n < self.cfg.accum_steps:  # no optimizer step would ever happen: epochs would pass without training
            raise ConfigError(f"accum_steps {self.cfg.accum_steps} is more than the {n} batch(es) of an epoch; lower "
                              "it, or the batch size", field="accum_steps")
        return max(1, n // self.cfg.accum_steps)

    def _autocast(self):
        c = self.cfg
        if c.precision == "fp32":
            return nullcontext()
        dtype = torch.bfloat16 if c.precision == "bf16" else torch.float16
        return torch.autocast(self.device.type, dtype=dtype)

    def _prepare(self) -> None:
        c = self.cfg
        torch.manual_seed(c.seed + 1000 * self.dist.rank)  # dropout / drop-path stream, per rank
        self.optimizer = build_optimizer(self.model, c.lr, c.weight_decay, c.betas, c.layer_decay)
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=c.precision == "fp16")
        self.ema = EMA(self.model, c.ema_decay) if c.ema_decay > 0 else None
        net = self.model
        if c.compile:
            net = torch.compile(net)
        if self.dist.world > 1:
            from torch.nn.parallel import DistributedDataParallel as DDP

            net = DDP(net, device_ids=[self.device.index] if self.device.type == "cuda" else None)
        self.net = net
        spe = self._steps_per_epoch()
        self.steps_per_epoch = spe
        if not self.plan:
            total = (c.epochs or DEFAULT_EPOCHS) * spe
            self.plan = {"total": total, "warmup": self._warmup_steps(total, spe), "planned": c.time_budget is None}

    def _warmup_steps(self, total: int, spe: int) -> int:
        w = self.cfg.warmup
        n = int(round(w * spe)) if w >= 1 else int(round(w * total))
        return max(1, min(n, max(1, total - 1)))

    @property
    def eval_model(self) -> nn.Module:
        return self.ema.module if self.ema is not None else self.model

    # ---- checkpoints ----------------------------------------------------------------------------------------
    def _state(self) -> dict:
        s = {"step": self.step, "epoch": self.epoch, "model": self.model.state_dict(),
             "optimizer": self.optimizer.state_dict(), "scaler": self.scaler.state_dict(),
             "rng_cpu": torch.get_rng_state(), "best": self.best, "best_epoch": self.best_epoch,
             "elapsed": self._spent(), "plan": dict(self.plan),
             "finished": self.finished, "history": self.history}
        if self.device.type == "cuda":
            s["rng_cuda"] = torch.cuda.get_rng_state(self.device)
        if self.ema is not None:
            s["ema"] = self.ema.state_dict()
        return s

    def _save(self, is_best: bool) -> None:
        from ..io import save

        meta = {"epoch": self.epoch, "step": self.step, "run": self.cfg.name,
                "metrics": self.history[-1] if self.history else {}}
        save(self.eval_model, self.run.path / "last.safetensors", extra=meta)
        state = self._state()
        atomic_write(self.run.path / "last.state.pt", lambda tmp: torch.save(state, tmp))
        if is_best:
            # copy rather than save again: the same bytes, and still atomic
            atomic_write(self.run.path / "best.safetensors",
                         lambda tmp: shutil.copyfile(self.run.path / "last.safetensors", tmp))

    def _load_state(self, path: Path) -> None:
        f = path / "last.state.pt"
        if not f.is_file():
            raise ConfigError(f"cannot resume {str(path)!r}: it has no last.state.pt (the run stopped before its "
                              "first checkpoint, or is not a vitkit run); run the same command again without --resume "
                              "(a run folder without a checkpoint is replaced)")
        try:
            s = torch.load(f, map_location="cpu", weights_only=True)
        except Exception as e:
            raise ConfigError(f"cannot resume {str(path)!r}: last.state.pt is unreadable ({e})") from None
        from ..io import load_state_dict_checked

        load_state_dict_checked(self.model, s["model"], source=str(f))
        self.optimizer.load_state_dict(s["optimizer"])
        self.scaler.load_state_dict(s["scaler"])
        if self.ema is not None:
            if "ema" not in s:
                raise ConfigError(f"{str(path)!r} was trained without EMA; resume it with the same options")
            self.ema.load_state_dict(s["ema"])
        torch.set_rng_state(s["rng_cpu"])
        if "rng_cuda" in s and self.device.type == "cuda":
            torch.cuda.set_rng_state(s["rng_cuda"], self.device)
        self.step, self.epoch = int(s["step"]), int(s["epoch"])
        self.best, self.best_epoch = s["best"], s["best_epoch"]
        self.elapsed, self.plan, self.finished = float(s["elapsed"]), dict(s["plan"]), bool(s["finished"])
        self.history = list(s["history"])

    def _resume_changes(self, path: Path) -> Dict[str, list]:
        """The resume-safe fields this resume changes against the run's config.json ({field: [old, new]}), with
        the schedule re-laid for a new --epochs or --time-budget (a cosine over the new total, from this step on);
        a finished run resumes only when its schedule grows."""
        c = self.cfg
        f = path / "config.json"
        saved = json.loads(f.read_text()).get("train") if f.is_file() else None
        old = TrainConfig.from_dict(saved) if saved else c
        changed = {k: [getattr(old, k), getattr(c, k)] for k in RESUMABLE
                   if k != "quiet" and getattr(old, k) != getattr(c, k)}
        done = f"run {str(path)!r} has trained {self.step / self.steps_per_epoch:.3g} epochs ({self.step} steps)"
        if "time_budget" in changed and c.time_budget is not None:
            if c.time_budget <= self.elapsed + self.time_spent:
                raise ConfigError(f"--time-budget {c.time_budget:.0f}s is too short: {done} in "
                                  f"{self.elapsed:.0f} s, and the budget counts the whole run; give more")
            per_step = self.elapsed / max(1, self.step)  # until this process has measured its own steps
            self.plan.update(total=self.step + max(1, int((c.time_budget - self.elapsed) / max(per_step, 1e-9))),
                             planned=False, keep_warmup=True)
            self.finished = False
        elif "epochs" in changed or "time_budget" in changed:  # a new epoch count, or epochs instead of a budget
            total = (c.epochs or DEFAULT_EPOCHS) * self.steps_per_epoch
            if total <= self.step:
                raise ConfigError(f"--epochs {c.epochs} is too few: {done} already; give more")
            self.plan.update(total=total, planned=True)
            self.plan.pop("epochs", None)
            self.finished = False
        if self.finished:
            raise ConfigError(f"run {str(path)!r} has finished already ({self.epoch} epochs, {self.step} steps); to "
                              "train it further, resume it with a larger --epochs or --time-budget")
        return changed

    def _record_resume(self, changed: Dict[str, list]) -> None:
        """config.json: the changed values written in (it describes the run as it now goes on), and one `history`
        entry for this resume: when, at which epoch and step, and what changed."""
        f = self.run.path / "config.json"
        if not f.is_file():
            return
        saved = json.loads(f.read_text())
        for k, (_, new) in changed.items():
            saved.setdefault("train", {})[k] = new
            values = (saved.get("recipe") or {}).get("values")
            if isinstance(values, dict) and k in values:
                values[k] = new
        from datetime import datetime, timezone

        saved.setdefault("history", []).append({
            "resumed": datetime.now(timezone.utc).isoformat(timespec="seconds"), "pid": os.getpid(),
            "epoch": self.epoch, "step": self.step,
            "changed": {k: {"from": old, "to": new} for k, (old, new) in changed.items()}})
        self.run.write_json("config.json", saved)

    # ---- time budget ----------------------------------------------------------------------------------------
    def _spent(self) -> float:
        """Budget seconds used so far: before fit (the caller's), in earlier processes (resume), and in this one."""
        return self.elapsed + self.time_spent + (self.clock() - self._t0)

    def _replan(self, sec_per_step: float, eval_secs: float) -> None:
        """Set the total step count so that training, the evaluations, the checkpoints and the caller's reserve fit
        in the budget. `sec_per_step` is the current cost of a step at unit `step_cost`."""
        c = self.cfg
        left = c.time_budget - self._spent() - self.reserve - eval_secs  # keep one evaluation for the final one
        per_step_extra = (eval_secs / self._eval_every() + self._save_secs) / self.steps_per_epoch
        total = fit_steps(self.step, max(0.0, left), sec_per_step, per_step_extra, self.step_cost)
        if not self.plan.get("planned"):
            if not self.plan.pop("keep_warmup", False):  # a resumed run given a budget is past its warm-up
                self.plan["warmup"] = self._warmup_steps(total, self.steps_per_epoch)
            self.plan["planned"] = True
        self.plan["total"] = max(total, self.step + 1)
        self.plan["epochs"] = round(self.plan["total"] / self.steps_per_epoch, 2)

    # ---- the loop -------------------------------------------------------------------------------------------
    def fit(self) -> dict:
        """Train to the end of the schedule (or budget), evaluating and checkpointing each epoch; return the
        summary that also goes to report.json (rank 0; other ranks get the same dict without file outputs)."""
        if self.run is not None or not self.dist.is_main:
            return self._fit()
        with claim_run(self.cfg) as run:
            self.run = run
            return self._fit()

    def _fit(self) -> dict:
        c = self.cfg
        self._t0 = self.clock()
        self._prepare()
        if self.dist.is_main:
            if c.resume:
                ours = ("last.safetensors", "last.state.pt", "best.safetensors", "metrics.csv", "config.json")
                for tmp in self.run.path.glob(".*.tmp"):  # half-written files of a process that was killed
                    if any(tmp.name.startswith(f".{n}.") for n in ours):
                        tmp.unlink()
            else:
                self.run.start()
        changed = {}
        if c.resume:
            if not Path(c.resume).is_dir():
                raise ConfigError(f"cannot resume {c.resume!r}: no such run folder")
            self._load_state(Path(c.resume))
            changed = self._resume_changes(Path(c.resume))
            log.info("resuming %s at epoch %d, step %d", c.resume, self.epoch, self.step)
        self._t0 = self.clock()
        if self.dist.is_main and not c.resume:
            self.run.write_json("config.json", {"train": c.to_dict(), **self.resolved,
                                                "world_size": self.dist.world, "torch": torch.__version__})
        elif self.dist.is_main:
            self._record_resume(changed)
        _barrier(self.dist)
        try:
            return self._loop()
        finally:
            if getattr(self, "_bar", None) is not None:
                self._bar.close()

    def _loop(self) -> dict:
        c = self.cfg
        budget = c.time_budget is not None
        eval_secs = next((r["eval_seconds"] for r in reversed(self.history) if "eval_seconds" in r), 0.0)
        self._bar = None
        if self.dist.is_main and not c.quiet:
            from tqdm.auto import tqdm

            self._bar = tqdm(total=self.plan["total"], initial=self.step, unit="step", dynamic_ncols=True,
                             leave=True, mininterval=0.5)
        step_times: List[float] = []
        stop = False
        while not stop and self.step < self.plan["total"]:
            ep = self.epoch
            self.net.train()
            t_ep, n_img = self.clock(), 0
            sums: Dict[str, float] = {}
            n_batches = 0
            loader = self._loader(ep)
            micro = 0
            t_step = self.clock()
            for batch in loader:
                batch = _to_device(batch, self.device)
                last_micro = (micro + 1) % c.accum_steps == 0
                sync = nullcontext() if last_micro or self.dist.world == 1 else self.net.no_sync()
                with sync:
                    with self._autocast():
                        loss, metrics = self.loss_fn(self.net, batch)
                    self.scaler.scale(loss / c.accum_steps).backward()
                lval = self._check_finite(loss)
                sums["loss"] = sums.get("loss", 0.0) + lval
                for k, v in (metrics or {}).items():
                    sums[k] = sums.get(k, 0.0) + float(v)
                n_batches += 1
                n_img += _batch_len(batch) * self.dist.world
                micro += 1
                if not last_micro:
                    continue
                lr = lr_at(self.step, self.plan["total"], self.plan["warmup"], c.lr, c.min_lr)
                set_lr(self.optimizer, lr)
                if c.clip_grad:
                    self.scaler.unscale_(self.optimizer)
                    torch.nn.utils.clip_grad_norm_(self.model.parameters(), c.clip_grad)
                self.scaler.step(self.optimizer)
                self.scaler.update()
                self.optimizer.zero_grad(set_to_none=True)
                if self.ema is not None:
                    self.ema.update(self.model)
                self.step += 1
                now = self.clock()
                step_times.append((now - t_step) / self.step_cost(self._progress(self.step - 1)))
                t_step = now
                if self._bar is not None:
                    self._bar.set_description(f"epoch {ep + 1}", refresh=False)
                    self._bar.set_postfix(loss=f"{lval:.4f}", lr=f"{lr:.2e}",
                                          img_s=f"{n_img / max(1e-9, now - t_ep):.0f}", refresh=False)
                    self._bar.update(1)
                if budget:
                    stop = self._budget_step(step_times, eval_secs)
                if self.step >= self.plan["total"] or stop or (c.max_steps and self.step >= c.max_steps):
                    stop = stop or bool(c.max_steps and self.step >= c.max_steps)
                    break
            train_secs = self.clock() - t_ep
            self.epoch = ep + 1
            final = stop or self.step >= self.plan["total"]
            row = {"epoch": self.epoch, "step": self.step,
                   "train_loss": sums.get("loss", 0.0) / max(1, n_batches)}
            row.update({f"train_{k}": v / max(1, n_batches) for k, v in sums.items() if k != "loss"})
            row.update({"lr": self.optimizer.param_groups[0]["lr"] / self.optimizer.param_groups[0].get("lr_scale", 1),
                        "img_per_s": n_img / max(1e-9, train_secs), "seconds": train_secs})
            evaluate = final or self.epoch % self._eval_every() == 0
            if evaluate:
                t_ev = self.clock()
                row.update(self._evaluate())
                eval_secs = row["eval_seconds"] = self.clock() - t_ev
                if budget and c.eval_every is None and "eval_every" not in self.plan:
                    self._plan_eval_every(eval_secs, train_secs)
            t_save = self.clock()
            self._end_epoch(row, final, evaluated=evaluate)  # a checkpoint every epoch, evaluated or not
            self._save_secs = self.clock() - t_save
            if budget and not final and step_times:
                recent = step_times[2:][-50:] or step_times  # the machine's current speed, per unit step cost
                self._replan(_median(recent), eval_secs if self.history else self._guess_eval_secs(step_times))
                self.plan = _broadcast_obj(self.plan, self.dist)
                if self._bar is not None:
                    self._bar.total = self.plan["total"]
                    self._bar.refresh()
            if self.on_epoch_end is not None:
                self.on_epoch_end(self, row)
            if final:
                break
        return self._finish()

    def _eval_every(self) -> int:
        """Epochs between evaluations: the flag's, else the one planned under a time budget, else 1."""
        return self.cfg.eval_every or self.plan.get("eval_every") or 1

    def _plan_eval_every(self, eval_secs: float, epoch_secs: float) -> None:
        """After the first evaluation under a budget: evaluate every N epochs so that evaluating costs about
        EVAL_SHARE of the training time (a held-out pass can cost a seventh of an epoch: that is a seventh of the
        budget not spent training). Saved in the plan, so a resumed run keeps the cadence."""
        n = max(1, math.ceil(eval_secs / max(1e-9, EVAL_SHARE * epoch_secs)))
        self.plan["eval_every"] = n
        if n > 1:
            log.info("evaluating every %d epochs and at the end: an evaluation takes %.1f s, an epoch %.1f s "
                     "(--eval-every sets it)", n, eval_secs, epoch_secs)

    def _budget_step(self, step_times: List[float], eval_secs: float) -> bool:
        """After each step under a time budget: plan the schedule once the throughput is known (after 5 steps,
        ignoring the first two), and stop when the budget is spent. Rank 0 decides for all."""
        c = self.cfg
        stop = False
        if self.dist.is_main:
            if not self.plan.get("planned") and len(step_times) >= 5:
                self._replan(_median(step_times[2:]), eval_secs or self._guess_eval_secs(step_times))
            stop = self._spent() + (eval_secs or self._guess_eval_secs(step_times)) + self._save_secs + self.reserve \
                >= c.time_budget
        if self.dist.world > 1:
            self.plan, stop = _broadcast_obj((self.plan, stop), self.dist)
        if self._bar is not None and self._bar.total != self.plan["total"]:
            self._bar.total = self.plan["total"]
        return stop

    def _progress(self, step: int) -> float:
        """Where `step` sits in the schedule, 0 to 1."""
        return step / max(1, self.plan.get("total") or 1)

    def _guess_eval_secs(self, step_times: List[float]) -> float:
        """Before the first evaluation: forward-only ≈ a third of a training step per image, plus a save."""
        n_val = self.resolved.get("data", {}).get("num_val", 0) if isinstance(self.resolved.get("data"), dict) else 0
        per_img = _median(step_times) / max(1, self.cfg.batch_size * self.cfg.accum_steps)
        return n_val * per_img / 3 + 0.5

    def _check_finite(self, loss: torch.Tensor) -> float:
        val = loss.detach().float()
        if self.dist.world > 1:
            import torch.distributed as dist

            val = val.clone()
            dist.all_reduce(val)
            val /= self.dist.world
        v = float(val)
        if not math.isfinite(v):
            where = f"; the last good checkpoint is in {self.run.path if self.run else self.cfg.resume}" \
                if self.epoch > 0 else ""
            advice = ["lower --lr"]  # only the changes that are not made already
            advice.append("keep --clip-grad on" if self.cfg.clip_grad else "turn --clip-grad on (e.g. 1.0)")
            if self.cfg.precision != "fp32":
                advice.append("use --precision fp32")
            raise TrainingDiverged(f"the loss became {v} at step {self.step + 1} (epoch {self.epoch + 1}){where}; "
                                   f"{', '.join(advice[:-1])} or {advice[-1]}")
        return v

    @torch.no_grad()
    def _evaluate(self) -> dict:
        if self.eval_fn is None or not self.dist.is_main:
            return {}
        m = self.eval_model
        m.eval()
        with self._autocast():
            out = self.eval_fn(m)
        self.model.train()
        return {k: (float(v) if isinstance(v, (int, float)) or torch.is_tensor(v) else v) for k, v in out.items()}

    def _end_epoch(self, row: dict, final: bool, evaluated: bool = True) -> None:
        """Rank 0: record the row, decide best (on evaluated epochs), write metrics and checkpoints. Everyone
        waits for it."""
        if self.dist.is_main:
            self.history.append(row)
            metric = self.cfg.best_metric
            val = row.get(metric) if metric else None
            better = val is not None and (self.best is None or (val > self.best if self.cfg.best_mode == "max"
                                                                 else val < self.best))
            if better:
                self.best, self.best_epoch = float(val), self.epoch
            if evaluated and (not metric or (val is None and self.best is None)):
                better = True  # no selection: best.safetensors is the latest evaluated checkpoint
                self.best_epoch = self.epoch
            self.finished = final
            self._save(better)
            self.run.write_metrics(self.history)
            self._log_row(row)
        _barrier(self.dist)

    def _log_row(self, row: dict) -> None:
        keys = ("train_loss", "val_loss", "top1", "top5", "lr", "img_per_s")
        parts = [f"{k}={row[k]:.4g}" for k in keys if isinstance(row.get(k), float)]
        msg = f"epoch {row['epoch']} step {row['step']}: " + " ".join(parts)
        if self._bar is not None:
            self._bar.write(msg)
        else:
            log.info(msg)

    def _finish(self) -> dict:
        total_secs = self.elapsed + (self.clock() - self._t0)
        budget_secs = self._spent()
        last = self.history[-1] if self.history else {}
        summary = {"name": self.cfg.name, "run_dir": str(self.run.path) if self.run else None,
                   "epochs": self.epoch, "steps": self.step, "planned_steps": self.plan.get("total"),
                   "train_seconds": round(total_secs, 2), "best_metric": self.cfg.best_metric,
                   "best": self.best, "best_epoch": self.best_epoch, "final": last,
                   "time_budget": self.cfg.time_budget, "budget_seconds": round(budget_secs, 2),
                   "world_size": self.dist.world}
        if self.dist.is_main:
            if self.end_fn is not None:
                extra = self.end_fn(self, summary) or {}
                md_extra = extra.pop("markdown", "")
                summary.update(extra)
            else:
                md_extra = ""
            self.run.write_json("report.json", summary)
            self.run.write_text("report.md", _report_md(summary, self.history) + md_extra)
        _barrier(self.dist)
        return summary


def _report_md(s: dict, history: List[dict]) -> str:
    lines = [f"# Run `{s['name']}`", "",
             f"- {s['epochs']} epochs, {s['steps']} steps, {s['train_seconds']:.0f} s of training"
             + (f" (budget {s['time_budget']:.0f} s)" if s.get("time_budget") else ""),
             f"- best {s['best_metric']}: {s['best']} (epoch {s['best_epoch']})" if s.get("best") is not None
             else "- no evaluation metric", ""]
    if history:
        keys = [k for k in ("epoch", "train_loss", "val_loss", "top1", "top5", "lr", "img_per_s", "seconds")
                if any(k in r for r in history)]
        lines += ["| " + " | ".join(keys) + " |", "|" + "---|" * len(keys)]
        for r in history:
            lines.append("| " + " | ".join(_fmt(r.get(k, "")) for k in keys) + " |")
        lines.append("")
    return "\n".join(lines) + "\n"


def _fmt(v) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v)


def fit_steps(step: int, seconds: float, sec_per_step: float, per_step_extra: float,
              step_cost: Callable[[float], float]) -> int:
    """The largest total T >= step such that steps step..T-1, each costing sec_per_step * step_cost(s / T) plus
    per_step_extra, fit in `seconds` (the cost of a step depends on where it falls in a schedule of length T)."""
    def need(total: int) -> float:
        if total <= step:
            return 0.0
        n = total - step
        stride = max(1, n // 256)  # sample the cost curve: it changes a handful of times (progressive resizing)
        samples = [step_cost(s / total) for s in range(step, total, stride)]
        return n * (sec_per_step * sum(samples) / len(samples) + per_step_extra)

    unit = sec_per_step * min(step_cost(p / 10) for p in range(11)) + per_step_extra
    lo, hi = step, step + int(seconds / max(unit, 1e-9)) + 1
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if need(mid) <= seconds:
            lo = mid
        else:
            hi = mid - 1
    return lo


def _median(xs: List[float]) -> float:
    s = sorted(xs)
    return s[len(s) // 2] if s else 0.0


def _to_device(batch, device: torch.device):
    if torch.is_tensor(batch):
        return batch.to(device, non_blocking=True)
    if isinstance(batch, (list, tuple)):
        return type(batch)(_to_device(b, device) for b in batch)
    if isinstance(batch, dict):
        return {k: _to_device(v, device) for k, v in batch.items()}
    return batch


def _batch_len(batch) -> int:
    if torch.is_tensor(batch):
        return batch.shape[0]
    if isinstance(batch, (list, tuple)):
        return _batch_len(batch[0])
    if isinstance(batch, dict):
        return _batch_len(next(iter(batch.values())))
    return 1


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
                          "--eval-every, --workers and --device can); drop them, or start a new run")


def resume_configs(train_cfg: TrainConfig, task: str, section: str, task_cls, what: str, *, new_task=None,
                   requested: Optional[dict] = None):
    """The (task config, TrainConfig) to resume the run folder `train_cfg.resume` with: the ones in its
    config.json, refusing a folder of another task (`task`, e.g. 'classify'; `what` names it in the error).
    What the caller asks for (`train_cfg`'s and `new_task`'s fields set to a value other than the default and the
    run's, plus `requested` {field: value}) is applied when resume-safe (RESUMABLE) and refused otherwise."""
    path = Path(train_cfg.resume)
    cfg_file = path / "config.json"
    if not cfg_file.is_file():
        what_is = ("it never finished its first epoch and its folder has no config.json"
                   if path.is_dir() else "no such run folder")
        raise ConfigError(f"cannot resume {str(path)!r}: {what_is}; start the run again without --resume")
    if not (path / "last.state.pt").is_file():
        raise ConfigError(f"cannot resume {str(path)!r}: it has no last.state.pt (the run stopped before its first "
                          "checkpoint); run the same command again without --resume (a run folder without a "
                          "checkpoint is replaced)")
    saved = json.loads(cfg_file.read_text())
    if saved.get("task") != task:
        raise ConfigError(f"{str(path)!r} is a {saved.get('task')!r} run, not {what}")
    task_cfg = task_cls(**saved[section])
    tc = TrainConfig.from_dict(saved["train"])
    asked: Dict[str, Any] = {}
    for obj, old, default in ((train_cfg, tc, TrainConfig()), (new_task, task_cfg, task_cls() if new_task else None)):
        if obj is None:
            continue
        for f in fields(obj):
            v = getattr(obj, f.name)
            if f.name not in ("name", "runs_dir", "resume", "overwrite") and v != getattr(default, f.name) and \
                    v != getattr(old, f.name, v):
                asked[f.name] = v
    asked.update(requested or {})
    refuse_on_resume(path, [k for k in asked if k not in RESUMABLE] + (["--overwrite"] if train_cfg.overwrite else []))
    for k in RESUMABLE:
        if k in asked:
            setattr(tc, k, asked[k])
    if "epochs" in asked and "time_budget" not in asked:
        tc.time_budget = None  # an epoch count replaces the run's budget
    if "time_budget" in asked and "epochs" not in asked:
        tc.epochs = None
    tc.resume, tc.quiet, tc.device, tc.workers = str(path), train_cfg.quiet, train_cfg.device, train_cfg.workers
    tc.name, tc.runs_dir, tc.overwrite = path.name, str(path.parent), False
    return task_cfg, tc
