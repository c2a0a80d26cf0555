"""The run folder, `runs/<name>/`: everything a run writes, and the one way to read a run back.

Its files: `config.json` (everything resolved, enough to repeat the run), `metrics.csv` (one row per epoch;
held-out columns on evaluated epochs), `last.safetensors` / `best.safetensors` (weights — the EMA weights when EMA
is on — through `vitkit.save`), `last.state.pt` (training state: raw weights, optimizer, scaler, EMA, RNG, step,
epoch, the time-budget plan; plain tensors and dicts for `torch.load(weights_only=True)`; under `--strategy fsdp`
it holds the same less the tensors, which are in `state.dcp/step-N/`, a sharded torch.distributed.checkpoint that
last.state.pt names), `report.json`,
`report.md`. Every file is written atomically, so a kill at any moment leaves the last good checkpoint. `.lock`
holds the pid of the process that owns the folder, under an OS lock (`claim_run`). Readers open a run with
`RunDir.open(path)` and `read_config()`, which turn a missing folder or a missing or damaged config.json into one
line; `resume_configs` gives the configs to resume a run with; `elastic_resume` turns the command torchrun starts
again after a failure into a resume of the run its first attempt began.
"""
from __future__ import annotations

import csv
import io
import json
import logging
import os
import shutil
from contextlib import contextmanager
from dataclasses import fields, replace
from pathlib import Path
from typing import Any, Dict, List, Optional

from ..errors import ConfigError, RunExistsError
from ..io.checkpoint import atomic_write
from ..io.files import LockHeld, lock_file, write_pid
from .config import RESUMABLE, TrainConfig, refuse_on_resume
from .distributed import broadcast_obj, launch_identity, setup_distributed
from .sharded import SHARDED_DIR

log = logging.getLogger(__name__)

LOCK_FILE = ".lock"  # in every run folder: the pid of the process that owns it, flock'ed while it runs
CONFIG_FILE = "config.json"
STATE_FILE = "last.state.pt"
RESUME_ADVICE = "start the run again without --resume"


def _leftovers(path: Path) -> List[str]:
    """The entries of a run folder other than its lock file."""
    return sorted(p.name for p in path.iterdir() if p.name != LOCK_FILE) if path.is_dir() else []


def _is_tmp(name: str) -> bool:
    return name.startswith(".") and name.endswith(".tmp")  # atomic_write's half-written files


def _only_unfinished(names: List[str]) -> bool:
    """What a run that died before its first checkpoint leaves: config.json (or not even that), temp files, and
    sharded state that no last.state.pt points at yet."""
    return all(n in (CONFIG_FILE, SHARDED_DIR) or _is_tmp(n) for n in names)


class RunDir:
    """`runs/<name>/`: created fresh (refusing to overwrite unless asked), or reopened to resume; in both cases
    owned by one process at a time through an OS lock on `.lock` (flock: it dies with the process, so a killed run
    leaves no stale lock). Use through `claim_run`, which also releases it."""

    def __init__(self, path: Path, lock_fd: Optional[int] = None, doing: str = "cannot read", advice: str = ""):
        self.path = Path(path)
        self._fd = lock_fd
        self.created = False  # this process made the folder
        self.replace = False  # old contents to delete at `start` (--overwrite, or a run that never checkpointed)
        self.started = False  # `start` ran: everything in the folder is this run's
        self._doing, self._advice = doing, advice  # how a one-line error about it starts, and what it advises

    @classmethod
    def open(cls, path, doing: str = "cannot read", advice: str = "") -> "RunDir":
        """An existing run folder, to read; not locked, so a reader never waits for the run that writes it. Errors
        about it are one line: `doing`, the path, what is wrong, then `advice`."""
        run = cls(path, doing=doing, advice=advice)
        if not run.path.is_dir():
            raise run._error("no such run folder")
        return run

    @classmethod
    def to_resume(cls, path) -> "RunDir":
        """The run folder `--resume` names, to read; its errors say so and how to go on."""
        return cls.open(path, "cannot resume", RESUME_ADVICE)

    def _error(self, problem: str) -> ConfigError:
        advice = f"; {self._advice}" if self._advice else ""
        return ConfigError(f"{self._doing} {str(self.path)!r}: {problem}{advice}")

    def read_config(self, missing_ok: bool = False) -> Optional[dict]:
        """The run's config.json as a dict; None if it has none and `missing_ok`. A missing (otherwise), unreadable
        or damaged one is a one-line ConfigError."""
        f = self.path / CONFIG_FILE
        if not f.is_file():
            if missing_ok:
                return None
            raise self._error("it has no config.json (the run stopped before writing it, or the folder is not a "
                              "vitkit run)")
        return _parse_config(f, self._error, "its config.json")

    def state_file(self) -> Path:
        """The run's last.state.pt, to resume from: the one place a run without one is refused."""
        f = self.path / STATE_FILE
        if not f.is_file():
            raise ConfigError(f"cannot resume {str(self.path)!r}: it has no last.state.pt (the run stopped before its "
                              "first checkpoint, or is not a vitkit run); run the same command again without --resume "
                              "(a run folder without a checkpoint is replaced)")
        return f

    @staticmethod
    def _lock(path: Path, busy: str) -> Optional[int]:
        """Take `path/.lock` (making the folder); `busy` (with {pid}) is the RunExistsError if another process
        holds it. The owner writes its pid in once its checks pass (`_own`), so a refused claim leaves the file as
        it was."""
        try:
            return lock_file(path / LOCK_FILE, wait=False)
        except LockHeld as e:
            raise RunExistsError(busy.format(pid=e.pid)) from None

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
        path = cls.to_resume(path).path  # a one-line error when there is no such folder
        run = cls(path, cls._lock(path, f"cannot resume {str(path)!r}: process {{pid}} is running it now"))
        run._own()
        return run

    def _own(self) -> None:
        if self._fd is not None:
            write_pid(self._fd)

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
        return (self.path / STATE_FILE).is_file() or (self.path / "last.safetensors").is_file()

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

    def write_report(self, summary: dict, history: List[dict], markdown: str = "") -> None:
        """report.json (the summary) and report.md (the summary and the metrics table, then `markdown`)."""
        self.write_json("report.json", summary)
        self.write_text("report.md", _report_md(summary, history) + markdown)


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


def resume_configs(train_cfg: TrainConfig, task: str, section: str, task_cls, what: str, *, new_task=None,
                   requested: Optional[dict] = None):
    """The (task config, TrainConfig) to resume the run folder `train_cfg.resume` with: the ones in its
    config.json, refusing a folder of another task (`task`, e.g. 'classify'; `what` names it in the error).
    What the caller asks for (`train_cfg`'s and `new_task`'s fields set to a value other than the default and the
    run's, plus `requested` {field: value}) is applied when resume-safe (RESUMABLE) and refused otherwise."""
    run = RunDir.to_resume(train_cfg.resume)
    saved = run.read_config()
    run.state_file()
    path = run.path
    if saved.get("task") != task:
        raise ConfigError(f"{str(path)!r} is a {saved.get('task')!r} run, not {what}")
    for key in (section, "train"):
        if not isinstance(saved.get(key), dict):
            raise ConfigError(f"{str(path / 'config.json')!r} has no {key!r} section, so the run cannot resume: "
                              "restore the file from a backup, or start a new run")
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


def elastic_resume(cfg: TrainConfig) -> TrainConfig:
    """`cfg`, made a resume of its own run folder when torchrun has started this command again (`--max-restarts`
    after a worker failed, or the group re-formed when a node joined) and the folder holds a checkpoint that the same
    launch wrote: same rendezvous id and at least one of the same torchrun agents (see `launch_identity`). A folder
    another launch wrote is left to the usual "run exists" refusal. Every rank calls it (it joins the process
    group); unchanged outside torchrun or with --resume given."""
    if cfg.resume or "TORCHELASTIC_RUN_ID" not in os.environ:
        return cfg
    info = setup_distributed(cfg.device)
    me = launch_identity(info)
    path = Path(cfg.runs_dir) / cfg.name
    ours = False
    if info.is_main and (path / STATE_FILE).is_file():
        saved = RunDir.open(path).read_config(missing_ok=True) or {}
        launches = [saved.get("launch")] + [h.get("launch") for h in saved.get("history") or []]
        ours = any(isinstance(x, dict) and x.get("run_id") == me["run_id"] and set(x.get("agents") or ()) &
                   set(me["agents"]) for x in launches)
    if not broadcast_obj(ours, info):
        return cfg
    if info.is_main:
        log.warning("torchrun restarted this run: resuming %s from its last checkpoint", path)
    return replace(cfg, resume=str(path), overwrite=False)


def read_config(path, doing: str = "cannot read") -> dict:
    """A run's config: `path` is its folder or a config file (`--recipe` takes either); one-line errors."""
    path = Path(path)
    if path.is_file():
        return _parse_config(path, lambda problem: ConfigError(f"{doing} {str(path)!r}: {problem}"), "it")
    if not path.exists():
        raise ConfigError(f"{doing} {str(path)!r}: no such run folder or config.json")
    return RunDir.open(path, doing).read_config()


def _parse_config(f: Path, error, what: str) -> dict:
    """config.json's object; `error(problem)` makes the exception for a file that is unreadable or not one."""
    try:
        saved = json.loads(f.read_text())
    except (OSError, ValueError) as e:  # ValueError: not JSON, or not text at all (UnicodeDecodeError)
        raise error(f"{what} is not readable JSON ({' '.join(str(e).split())[:200]})") from None
    if not isinstance(saved, dict):
        raise error(f"{what} holds a JSON {type(saved).__name__}, not a run's configuration")
    return saved
