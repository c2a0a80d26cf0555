"""Where the work runs: the device a name like `auto` or `cuda:1` stands for on this machine, and vitkit's cache
folder.

Training and inference both resolve devices here; it imports nothing of vitkit's but its errors, so predicting
or embedding never loads the training engine.
"""
from __future__ import annotations

import os
import re
from pathlib import Path

import torch

from .errors import ConfigError


def check_device(name) -> str:
    """A device name vitkit understands (auto | cpu | cuda | cuda:N | mps), else a ConfigError naming `device`."""
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


def cache_dir() -> Path:
    """vitkit's cache folder (decoded image folders, measured precision times): $VITKIT_CACHE, else ~/.cache/vitkit."""
    return Path(os.environ.get("VITKIT_CACHE") or Path.home() / ".cache" / "vitkit")
