"""The training engine: one loop for every model vitkit trains (classifier, MAE, DiT).

A task brings the model, the data and two functions; the engine owns everything else — run folder, optimizer,
schedule (epochs or a wall-clock budget), precision, accumulation, clipping, EMA, distributed (DDP, or FSDP2 with
`strategy="fsdp"`), checkpoints, resume, metrics, progress bar and the NaN guard:

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

The run folder and its files are `rundir`'s; the time-budget plan is `budget`'s. Checkpoints are taken at epoch
ends, and every `save_every` steps inside an epoch with the data position (epoch, batch); `resume` continues from
the last one (mid-epoch: the loader starts at that batch) and, on the CPU, ends bit-identical to an uninterrupted
run. Under torchrun the global batch is split over the processes (DDP averages the gradients), so 1, 2 or N
processes train the same steps; with `strategy="fsdp"` the model is sharded (`sharded.shard_model`), the training
state is a sharded torch.distributed.checkpoint that resumes in any number of processes, and rank 0 gathers the full
weights for evaluation and the `.safetensors` checkpoints (after `fit`, `trainer.model` is the sharded module). A
resume may change only RESUMABLE fields; a new `epochs`/`time_budget` lays the cosine over the new total from the
current step (so a finished run trains on), and `config.json`'s `history` records each resume. The key third of
each qkv bias is held still (its gradient is exactly 0 in exact arithmetic: `optim.inert_key_biases`), so rounding
noise there does not become Adam steps and 1 and N processes end with the same weights, all of them.
"""
from __future__ import annotations

import copy
import logging
import math
import os
import shutil
import signal
import time
from contextlib import nullcontext
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Tuple

import torch
from torch import nn

from ..errors import ConfigError, VitkitError
from ..io.checkpoint import atomic_write
from . import budget
from .config import DEFAULT_EPOCHS, RESUMABLE, TrainConfig
from .distributed import DistInfo, barrier, broadcast_obj, launch_identity, setup_distributed
from .ema import EMA
from .optim import build_optimizer, inert_key_biases, lr_at, set_lr
from .rundir import STATE_FILE, RunDir, claim_run
from .sharded import SHARDED_DIR, gather_full, load_sharded, prune_sharded, save_sharded, shard_model

log = logging.getLogger(__name__)


class TrainingDiverged(VitkitError, ValueError):
    """The loss became NaN or infinite."""


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
        self._eval_scale = budget.FINAL_EVAL_MARGIN  # the last evaluation's seconds → what the final one may take
        self._data_pos: Optional[dict] = None  # where in an epoch a mid-epoch checkpoint was taken (see _save_mid)

    # ---- set-up ---------------------------------------------------------------------------------------------
    def _loader(self, epoch: int, start_batch: int = 0):
        """The epoch's batches; `start_batch` > 0 resumes mid-epoch (the loaders skip to it without producing the
        batches before; a task's own callable is advanced past them)."""
        if callable(self.train_data) and not hasattr(self.train_data, "__len__"):
            batches = self.train_data(epoch, self.dist.rank, self.dist.world)
            if start_batch:
                import itertools

                return itertools.islice(batches, start_batch, None)
            return batches
        from ..data import ShardDataset, make_loader

        kw = dict(self.loader_kwargs)
        if isinstance(self.train_data, ShardDataset):
            kw["streams"] = self.cfg.streams
        return make_loader(self.train_data, self.cfg.batch_size, train=True, seed=self.cfg.seed, epoch=epoch,
                           rank=self.dist.rank, world=self.dist.world, workers=self.cfg.workers,
                           start_step=self.step, total_steps=self.plan.get("total"), accum_steps=self.cfg.accum_steps,
                           start_batch=start_batch, **kw)

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
        self.ema = EMA(self.model, c.ema_decay) if c.ema_decay > 0 else None
        self.fsdp = c.strategy == "fsdp"  # sharded checkpoints, whatever the number of processes
        self.sharded = self.fsdp and self.dist.world > 1  # sharded weights: only with something to shard over
        self._replica = None  # under sharding: rank 0's full copy, for evaluation and .safetensors checkpoints
        if self.sharded:
            if self.dist.is_main:
                self._replica = copy.deepcopy(self.eval_model)
            shard_model(self.model, c.precision, self.device)
            if self.ema is not None:
                shard_model(self.ema.module)  # sharded alike, so the average runs shard by shard
        # after sharding: the optimizer holds the sharded parameters (and so only this rank's part of its state)
        self.optimizer = build_optimizer(self.model, c.lr, c.weight_decay, c.betas, c.layer_decay)
        self._inert = inert_key_biases(self.model)  # key biases: gradient masked to exactly 0 before each step
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=c.precision == "fp16")
        net = self.model
        if c.compile:
            net = torch.compile(net)
        if self.dist.world > 1 and not self.sharded:
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
        """What is evaluated and saved: the EMA weights when EMA is on; under sharding, rank 0's full copy of them
        as `_gather` last left it."""
        if getattr(self, "_replica", None) is not None:
            return self._replica
        return self.ema.module if self.ema is not None else self.model

    def _gather(self) -> None:
        """Under sharding (every rank calls it): the full evaluated weights into rank 0's copy."""
        if self.sharded:
            gather_full(self.ema.module if self.ema is not None else self.model, self._replica)

    # ---- checkpoints ----------------------------------------------------------------------------------------
    def _state(self, sharded: Optional[str] = None) -> dict:
        """The training state for last.state.pt; with `sharded` (the DCP folder that holds the weights, optimizer
        and EMA state, relative to the run folder) only the rest."""
        s = {"step": self.step, "epoch": self.epoch, "scaler": self.scaler.state_dict(),
             "rng_cpu": torch.get_rng_state(), "best": self.best, "best_epoch": self.best_epoch,
             "elapsed": self._spent(), "plan": dict(self.plan),
             "finished": self.finished, "history": self.history}
        if self._data_pos is not None:
            s["data_pos"] = dict(self._data_pos)
        if sharded is None:
            s.update(model=self.model.state_dict(), optimizer=self.optimizer.state_dict())
            if self.ema is not None:
                s["ema"] = self.ema.state_dict()
        else:
            s.update(sharded=sharded, ema_updates=self.ema.updates if self.ema is not None else None)
        if self.device.type == "cuda":
            s["rng_cuda"] = torch.cuda.get_rng_state(self.device)
        return s

    def _save_sharded(self) -> str:
        """Every rank writes its shards of this step's state (DCP); returns the folder, relative to the run's."""
        name = f"{SHARDED_DIR}/step-{self.step:09d}"
        save_sharded(self._run_path / name, self.model, self.optimizer,
                     self.ema.module if self.ema is not None else None)
        return name

    def _save(self, is_best: bool, sharded: Optional[str] = None) -> None:
        from ..io import save

        meta = {"epoch": self.epoch, "step": self.step, "run": self.cfg.name,
                "metrics": self.history[-1] if self.history else {}}
        save(self.eval_model, self.run.path / "last.safetensors", extra=meta)
        state = self._state(sharded)
        atomic_write(self.run.path / STATE_FILE, lambda tmp: torch.save(state, tmp))
        if sharded is not None:  # last.state.pt names the new step now: the older ones can go
            prune_sharded(self.run.path, keep=sharded)
        if is_best:
            # copy rather than save again: the same bytes, and still atomic
            atomic_write(self.run.path / "best.safetensors",
                         lambda tmp: shutil.copyfile(self.run.path / "last.safetensors", tmp))

    def _load_state(self, resumed: RunDir) -> None:
        path, f = resumed.path, resumed.state_file()
        try:
            s = torch.load(f, map_location="cpu", weights_only=True)
        except Exception as e:
            raise ConfigError(f"cannot resume {str(path)!r}: last.state.pt is unreadable ({e})") from None
        from ..io import load_state_dict_checked

        if ("sharded" in s) != self.fsdp:
            raise ConfigError(f"cannot resume {str(path)!r}: it was trained with --strategy "
                              f"{'fsdp' if 'sharded' in s else 'ddp'}; resume it with the same strategy")
        if self.ema is not None and s.get("ema", s.get("ema_updates")) is None:
            raise ConfigError(f"{str(path)!r} was trained without EMA; resume it with the same options")
        if self.fsdp:
            load_sharded(path / s["sharded"], self.model, self.optimizer,
                         self.ema.module if self.ema is not None else None)
            if self.ema is not None:
                self.ema.updates = int(s["ema_updates"])
            if self.dist.is_main:  # steps a killed process half-wrote after the one last.state.pt names
                prune_sharded(path, keep=s["sharded"])
        else:
            load_state_dict_checked(self.model, s["model"], source=str(f))
            self.optimizer.load_state_dict(s["optimizer"])
            if self.ema is not None:
                self.ema.load_state_dict(s["ema"])
        self.scaler.load_state_dict(s["scaler"])
        torch.set_rng_state(s["rng_cpu"])
        if "rng_cuda" in s and self.device.type == "cuda":
            torch.cuda.set_rng_state(s["rng_cuda"], self.device)
        self.step, self.epoch = int(s["step"]), int(s["epoch"])
        self.best, self.best_epoch = s["best"], s["best_epoch"]
        self.elapsed, self.plan, self.finished = float(s["elapsed"]), dict(s["plan"]), bool(s["finished"])
        self.history = list(s["history"])
        self._data_pos = s.get("data_pos")  # a mid-epoch checkpoint: the loop goes on from there

    def _resume_changes(self, resumed: RunDir) -> Dict[str, list]:
        """The resume-safe fields this resume changes against the run's config.json ({field: [old, new]}), with
        the schedule re-laid for a new --epochs or --time-budget (a cosine over the new total, from this step on);
        a finished run resumes only when its schedule grows."""
        c, path = self.cfg, resumed.path
        saved = (resumed.read_config(missing_ok=True) or {}).get("train")
        old = TrainConfig.from_dict(saved) if saved else c
        changed = {k: [getattr(old, k), getattr(c, k)] for k in RESUMABLE
                   if k != "quiet" and getattr(old, k) != getattr(c, k)}
        done = f"run {str(path)!r} has trained {self.step / self.steps_per_epoch:.3g} epochs ({self.step} steps)"
        if "time_budget" in changed and c.time_budget is not None:
            if c.time_budget <= self.elapsed + self.time_spent:
                raise ConfigError(f"--time-budget {c.time_budget:.0f}s is too short: {done} in "
                                  f"{self.elapsed:.0f} s, and the budget counts the whole run; give more")
            budget.replan_resumed(self.plan, step=self.step, elapsed=self.elapsed, seconds=c.time_budget)
            self.finished = False
        elif "epochs" in changed or "time_budget" in changed:  # a new epoch count, or epochs instead of a budget
            total = (c.epochs or DEFAULT_EPOCHS) * self.steps_per_epoch
            if total <= self.step:
                raise ConfigError(f"--epochs {c.epochs} is too few: {done} already; give more")
            self.plan.update(total=total, planned=True)
            self.plan.pop("epochs", None)
            self.plan.pop("anchor", None)
            self.finished = False
        if self.finished:
            raise ConfigError(f"run {str(path)!r} has finished already ({self.epoch} epochs, {self.step} steps); to "
                              "train it further, resume it with a larger --epochs or --time-budget")
        return changed

    def _record_resume(self, changed: Dict[str, list], launch: Optional[dict] = None) -> None:
        """config.json: the changed values written in (it describes the run as it now goes on), and one `history`
        entry for this resume: when, at which epoch and step, in how many processes (and which torchrun launch),
        and what changed."""
        saved = self.run.read_config(missing_ok=True)
        if saved is None:
            return
        for k, (_, new) in changed.items():
            saved.setdefault("train", {})[k] = new
            values = (saved.get("recipe") or {}).get("values")
            if isinstance(values, dict) and k in values:
                values[k] = new
        from datetime import datetime, timezone

        saved.setdefault("history", []).append({
            "resumed": datetime.now(timezone.utc).isoformat(timespec="seconds"), "pid": os.getpid(),
            "epoch": self.epoch, "step": self.step, "world_size": self.dist.world, "launch": launch,
            "changed": {k: {"from": old, "to": new} for k, (old, new) in changed.items()}})
        self.run.write_json("config.json", saved)

    # ---- time budget ----------------------------------------------------------------------------------------
    def _spent(self) -> float:
        """Budget seconds used so far: before fit (the caller's), in earlier processes (resume), and in this one."""
        return self.elapsed + self.time_spent + (self.clock() - self._t0)

    def _replan(self, sec_per_step: float, eval_secs: float) -> None:
        """Set the total step count so that training, the evaluations, the checkpoints and the caller's reserve fit
        in the budget. `sec_per_step` is the current cost of a step at unit `step_cost`; `eval_secs` the last
        evaluation's (or a guess)."""
        c = self.cfg
        # keep room for the final evaluation (with a margin, more if the steps have slowed since it was measured)
        left = c.time_budget - self._spent() - self.reserve - eval_secs * self._eval_scale
        per_step_extra = (eval_secs / self._eval_every() + self._save_secs) / self.steps_per_epoch
        budget.replan(self.plan, step=self.step, seconds=left, sec_per_step=sec_per_step,
                      per_step_extra=per_step_extra, steps_per_epoch=self.steps_per_epoch, step_cost=self.step_cost,
                      warmup_steps=lambda total: self._warmup_steps(total, self.steps_per_epoch))

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
        from ..data import ShardDataset

        if c.streams is None and isinstance(self.train_data, ShardDataset):  # fixed now, recorded in config.json
            from ..data.shards import stream_count

            c.streams = stream_count(None, self.dist.world, c.workers)
        self._prepare()
        if self.dist.is_main:
            if c.resume:
                ours = ("last.safetensors", STATE_FILE, "best.safetensors", "metrics.csv", "config.json")
                for tmp in self.run.path.glob(".*.tmp"):  # half-written files of a process that was killed
                    if any(tmp.name.startswith(f".{n}.") for n in ours):
                        tmp.unlink()
            else:
                self.run.start()
        # the run folder on every rank (rank 0 claimed it): sharded checkpoints are written by all
        self._run_path = Path(broadcast_obj(str(self.run.path) if self.dist.is_main else None, self.dist))
        launch = launch_identity(self.dist)  # under torchrun: lets a restarted group find this run (elastic_resume)
        changed = {}
        if c.resume:
            resumed = RunDir.to_resume(c.resume)  # also on ranks other than 0, which hold no claimed folder
            self._load_state(resumed)
            changed = self._resume_changes(resumed)
            log.info("resuming %s at epoch %d, step %d", c.resume, self.epoch, self.step)
        self._t0 = self.clock()
        if self.dist.is_main and not c.resume:
            self.run.write_json("config.json", {"train": c.to_dict(), **self.resolved,
                                                "world_size": self.dist.world, "torch": torch.__version__,
                                                "launch": launch})
        elif self.dist.is_main:
            self._record_resume(changed, launch)
        barrier(self.dist)
        try:
            return self._loop()
        finally:
            if getattr(self, "_bar", None) is not None:
                self._bar.close()

    def _loop(self) -> dict:
        c = self.cfg
        budgeted = c.time_budget is not None
        eval_secs = next((r["eval_seconds"] for r in reversed(self.history) if "eval_seconds" in r), 0.0)
        eval_speed = None  # seconds per step when the last evaluation was measured (unknown after a resume)
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
            pos, self._data_pos = self._resumed_position(ep), None
            if pos:
                sums, n_batches = dict(pos["sums"]), int(pos["batch"])  # the epoch's means cover all its batches
            loader = self._loader(ep, pos["batch"] if pos else 0)
            micro = 0
            t_step = self.clock()
            for batch in loader:
                batch = _to_device(batch, self.device)
                last_micro = (micro + 1) % c.accum_steps == 0
                if self.sharded:  # FSDP2: reduce-scatter the gradients on the last micro-batch only
                    self.model.set_requires_gradient_sync(last_micro)
                    sync = nullcontext()
                else:
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
                for p, mask in self._inert:
                    if p.grad is not None:
                        p.grad.mul_(mask)
                lr = lr_at(self.step, self.plan["total"], self.plan["warmup"], c.lr, c.min_lr, self.plan.get("anchor"))
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
                _test_crash(self.step, self.dist.rank)
                now = self.clock()
                step_times.append((now - t_step) / self.step_cost(self._progress(self.step - 1)))
                t_step = now
                if self._bar is not None:
                    self._bar.set_description(f"epoch {ep + 1}", refresh=False)
                    self._bar.set_postfix(loss=f"{lval:.4f}", lr=f"{lr:.2e}",
                                          img_s=f"{n_img / max(1e-9, now - t_ep):.0f}", refresh=False)
                    self._bar.update(1)
                if c.save_every and self.step % c.save_every == 0:
                    self._save_mid(ep, loader, n_batches, sums)
                if budgeted:
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
            speed = budget.current_speed(step_times) if step_times else None  # seconds per step now
            self._gather()  # under sharding, rank 0's copy gets the weights to evaluate and save
            if evaluate:
                t_ev = self.clock()
                row.update(self._evaluate())
                eval_secs = row["eval_seconds"] = self.clock() - t_ev
                eval_speed = speed
                if budgeted and c.eval_every is None and "eval_every" not in self.plan:
                    # saved in the plan, so a resumed run keeps the cadence
                    self.plan["eval_every"] = budget.eval_every_for(eval_secs, train_secs)
            t_save = self.clock()
            self._end_epoch(row, final, evaluated=evaluate)  # a checkpoint every epoch, evaluated or not
            self._save_secs = self.clock() - t_save
            if budgeted and not final and step_times:
                self._eval_scale = budget.final_eval_scale(speed, eval_speed)
                self._replan(speed, eval_secs if self.history else self._guess_eval_secs(step_times))
                self.plan = broadcast_obj(self.plan, self.dist)
                if self._bar is not None:
                    self._bar.total = self.plan["total"]
                    self._bar.refresh()
            if self.on_epoch_end is not None:
                self.on_epoch_end(self, row)
            if final:
                break
        return self._finish()

    def _resumed_position(self, epoch: int) -> Optional[dict]:
        """The data position a resumed mid-epoch checkpoint holds for `epoch` (else None). Good for any number of
        processes and workers: the loaders' global batches do not depend on them (shards: on the run's streams)."""
        pos = self._data_pos
        if not pos or int(pos["epoch"]) != epoch:
            return None
        return pos

    def _save_mid(self, epoch: int, loader, n_batches: int, sums: Dict[str, float]) -> None:
        """A checkpoint inside an epoch (`save_every`): the state with the data position, so that a resume skips
        the batches this epoch has used and yields exactly the ones it had left. Not at an epoch's last batch
        (the epoch-end checkpoint follows)."""
        try:
            if n_batches >= len(loader):
                return
        except TypeError:  # a task's own iterable without a length
            pass
        self._data_pos = {"epoch": epoch, "batch": n_batches, "sums": dict(sums), "world": self.dist.world,
                          "workers": self.cfg.workers}
        self._gather()  # under FSDP (every rank): the full weights for last.safetensors, then each rank's shards
        sharded = self._save_sharded() if self.fsdp else None
        if self.dist.is_main:
            self._save(False, sharded)
        self._data_pos = None
        barrier(self.dist)

    def _eval_every(self) -> int:
        """Epochs between evaluations: the flag's, else the one planned under a time budget, else 1."""
        return self.cfg.eval_every or self.plan.get("eval_every") or 1

    def _budget_step(self, step_times: List[float], eval_secs: float) -> bool:
        """After each step under a time budget: plan the schedule once the throughput is known (after 5 steps,
        ignoring the first two), and stop when the budget is spent. Rank 0 decides for all."""
        c = self.cfg
        stop = False
        if self.dist.is_main:
            if not self.plan.get("planned") and len(step_times) >= budget.FIRST_STEPS:
                self._replan(budget.first_speed(step_times), eval_secs or self._guess_eval_secs(step_times))
            final_eval = (eval_secs or self._guess_eval_secs(step_times)) * self._eval_scale
            stop = self._spent() + final_eval + self._save_secs + self.reserve \
                >= c.time_budget
        if self.dist.world > 1:
            self.plan, stop = broadcast_obj((self.plan, stop), self.dist)
        if self._bar is not None and self._bar.total != self.plan["total"]:
            self._bar.total = self.plan["total"]
        return stop

    def _progress(self, step: int) -> float:
        """Where `step` sits in the schedule, 0 to 1."""
        return step / max(1, self.plan.get("total") or 1)

    def _guess_eval_secs(self, step_times: List[float]) -> float:
        """Before the first evaluation: forward-only ≈ a third of a training step per image and view, plus a save."""
        n_val = self.resolved.get("data", {}).get("num_val", 0) if isinstance(self.resolved.get("data"), dict) else 0
        views = int(self.resolved.get("eval_views", 1) or 1)  # a classifier's test-time views
        return budget.guess_eval_secs(step_times, n_val, self.cfg.batch_size * self.cfg.accum_steps, views)

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
        """Rank 0: record the row, decide best (on evaluated epochs), write metrics and checkpoints (with FSDP,
        every rank first writes its shards of the training state). Everyone waits for it."""
        sharded = self._save_sharded() if self.fsdp else None
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
            self._save(better, sharded)
            self.run.write_metrics(self.history)
            self._log_row(row)
        barrier(self.dist)

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
            self.run.write_report(summary, self.history, md_extra)
            self._stamp_checkpoints(summary)
        barrier(self.dist)
        return summary

    def _stamp_checkpoints(self, summary: dict) -> None:
        """Put a compact summary of the report into last.safetensors and best.safetensors (metadata `report`), so
        the training figures travel with a checkpoint copied out of its run folder (`vitkit serve`'s model card).
        The held-out evaluation (`eval`, of the best checkpoint) goes only into files holding those weights."""
        from ..io.checkpoint import add_metadata

        for name, epoch in (("best.safetensors", self.best_epoch), ("last.safetensors", self.epoch)):
            path = self.run.path / name
            if path.is_file():
                row = next((r for r in reversed(self.history) if r.get("epoch") == epoch), {})
                add_metadata(path, {"report": report_record(summary, self.resolved, epoch, row,
                                                            with_eval=epoch == self.best_epoch)})


def report_record(summary: dict, resolved: dict, epoch: Optional[int], row: Optional[dict] = None,
                  with_eval: bool = True) -> dict:
    """The compact part of a run's report that travels inside a checkpoint: run, epochs, steps, training time, the
    metrics of the checkpoint's own epoch (`epoch`, `row`), the best, the held-out evaluation (`with_eval`), the
    data (size, classes), the date and the vitkit version; numbers only (per-class lists stay in the run folder)."""
    import datetime
    from importlib import metadata

    try:  # the installed distribution's version (the package facade, vitkit.__version__, sits above train/)
        version = metadata.version("vitkit")
    except metadata.PackageNotFoundError:
        version = None
    def numbers(d) -> dict:
        return {k: (round(v, 6) if isinstance(v, float) else v) for k, v in (d or {}).items()
                if isinstance(v, (int, float)) and not isinstance(v, bool)}

    data = resolved.get("data") if isinstance(resolved.get("data"), dict) else {}
    rec = {"run": summary.get("name"), "epoch": epoch, "epochs": summary.get("epochs"), "steps": summary.get("steps"),
           "train_seconds": summary.get("train_seconds"), "world_size": summary.get("world_size"),
           "best_metric": summary.get("best_metric") or None, "best": summary.get("best"),
           "best_epoch": summary.get("best_epoch"), "metrics": numbers(row),
           "eval": numbers(summary.get("eval")) if with_eval else None,
           "data": {**{k: v for k, v in data.items() if isinstance(v, (str, int, float)) and v != ""},
                    **({"num_classes": len(data["class_names"])} if isinstance(data.get("class_names"), list) else {})},
           "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
           "vitkit_version": version}
    return {k: v for k, v in rec.items() if v not in (None, {}, "")}


def _test_crash(step: int, rank: int) -> None:
    """Test hook: VITKIT_TEST_CRASH=<rank>:<step> SIGKILLs that rank's process right after that optimizer step, on
    torchrun's first attempt only (TORCHELASTIC_RESTART_COUNT 0 or unset), as a machine failure would; unset (always,
    outside tests) it does nothing."""
    spec = os.environ.get("VITKIT_TEST_CRASH")
    if spec and os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") == "0" and spec == f"{rank}:{step}":
        os.kill(os.getpid(), signal.SIGKILL)


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
