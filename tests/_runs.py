"""Helpers for the tests that train tiny runs: a classifier task and engine config of a given size, a callback
that cuts a run after an epoch (as a kill would, but in-process), killing a subprocess with SIGKILL, a torchrun
launch of a few CPU processes."""
import os
import signal

import torch

from vitkit.tasks.classify import ClassifierConfig
from vitkit.train import TrainConfig


def tiny_task(model_args: dict, max_train: int, max_val: int, **kw) -> ClassifierConfig:
    """mnist5k on `vit_mini_patch7_28` shrunk by `model_args`, on a stratified subset."""
    base = dict(data="mnist5k", model="vit_mini_patch7_28", model_args=dict(model_args), max_train=max_train,
                max_val=max_val)
    base.update(kw)
    return ClassifierConfig(**base)


def tiny_tc(tmp_path, name: str, epochs: int, **kw) -> TrainConfig:
    """A quiet run `name` under `tmp_path`: batch 64, lr 2e-3, `epochs` unless `kw` says otherwise."""
    base = dict(name=name, runs_dir=str(tmp_path), epochs=epochs, batch_size=64, lr=2e-3, quiet=True)
    base.update(kw)
    return TrainConfig(**base)


class Interrupt(Exception):
    """Raised by `stop_after` to cut a run at the end of an epoch."""


def stop_after(epoch: int = 1):
    """An `on_epoch_end` callback that raises Interrupt once epoch `epoch` has ended (and been checkpointed)."""

    def stop(trainer, row):
        if row["epoch"] == epoch:
            raise Interrupt

    return stop


def kill9(proc) -> None:
    """SIGKILL a subprocess if it still runs, reap it and close its stderr pipe: the `finally` of a kill test."""
    try:
        if proc.poll() is None:
            os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.stderr:
            proc.stderr.close()


def torchrun(args, nproc: int = 2, timeout: float = 280):
    """`python -m torch.distributed.run --standalone --nproc_per_node=NPROC ARGS...` on this checkout's src (gloo on
    the CPU, one OpenMP thread per process, passive waits): the finished CompletedProcess, output captured."""
    import subprocess
    import sys

    env = dict(os.environ, OMP_NUM_THREADS="1", OMP_WAIT_POLICY="PASSIVE")
    src = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", "src"))
    env["PYTHONPATH"] = src + os.pathsep + env.get("PYTHONPATH", "")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", *map(str, args)]
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)
