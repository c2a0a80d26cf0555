"""Reading weights from disk or the Hugging Face hub without ever running code from the file.

`.safetensors` and `.npz` (allow_pickle=False) hold only arrays; `.pth/.pt/.bin/.ckpt` go through
`torch.load(weights_only=True)`, which refuses any pickled object but tensors and plain containers. The one
extra class allowed is `argparse.Namespace`, which DeiT/MAE training checkpoints carry as `args`: it is a bag
of attributes and constructs nothing else.

Also the one OS file lock (`lock_file`) that guards what several vitkit processes may write: run folders, embeddings
files and indexes.
"""
from __future__ import annotations

import json
import logging
import os
import time
from pathlib import Path
from typing import Dict, Optional, Tuple

import numpy as np
import torch

from ..errors import CheckpointError

try:
    import fcntl
except ImportError:  # Windows: no flock, so nothing is locked there
    fcntl = None

log = logging.getLogger(__name__)

TORCH_SUFFIXES = (".pth", ".pt", ".bin", ".ckpt", ".tar")
WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin", "model.npz", "pytorch_model.pth")


def read_json(path: Path) -> dict:
    try:
        return json.loads(Path(path).read_text())
    except (OSError, ValueError) as e:
        raise CheckpointError(f"{str(path)!r} is not readable JSON ({e}); fix or remove it") from None


def load_torch_file(path: Path) -> dict:
    """A pickled PyTorch checkpoint, read with weights_only=True: a file that needs any other object is refused."""
    import argparse
    import pickle

    path = Path(path)
    try:
        with torch.serialization.safe_globals([argparse.Namespace]):
            obj = torch.load(str(path), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        import re

        found = re.search(r"GLOBAL ([\w.]+)", str(e))
        what = f"it needs the Python object {found.group(1)}" if found else " ".join(str(e).split())[-200:]
        raise CheckpointError(
            f"{str(path)!r} was refused: loading it would unpickle objects other than tensors, which can run "
            f"arbitrary code ({what}). vitkit loads only weights; if you trust the file, re-save its state dict "
            "with torch.save(state_dict, 'clean.pth') or as safetensors") from None
    except (RuntimeError, EOFError, ValueError, OSError, KeyError, IndexError, TypeError, AttributeError) as e:
        # random or damaged bytes can trip torch's weights-only unpickler anywhere (KeyError on an unknown memo
        # slot, IndexError on an empty stack): all of it means "not a checkpoint", never a traceback
        raise CheckpointError(
            f"{str(path)!r} could not be read as a PyTorch checkpoint ({type(e).__name__}: "
            f"{' '.join(str(e).split())[:200]}); it may be truncated or of another format — re-download it") from None
    if isinstance(obj, torch.Tensor) or not isinstance(obj, dict):
        raise CheckpointError(f"{str(path)!r} holds a {type(obj).__name__}, not a state dict (a dict of tensors)")
    return obj


def load_safetensors_file(path: Path) -> Tuple[Dict[str, torch.Tensor], Dict[str, str]]:
    from safetensors import safe_open

    try:
        out = {}
        with safe_open(str(path), framework="pt") as f:
            meta = dict(f.metadata() or {})
            for k in f.keys():
                out[k] = f.get_tensor(k)
        return out, meta
    except Exception as e:  # safetensors raises its own error types for a truncated or foreign file
        raise CheckpointError(f"{str(path)!r} is not a readable safetensors file ({str(e).splitlines()[0]}); "
                              "it may be truncated — re-download it") from None


def load_npz_file(path: Path) -> Dict[str, np.ndarray]:
    try:
        with np.load(str(path), allow_pickle=False) as f:
            return {k: f[k] for k in f.files}
    except ValueError as e:
        if "pickle" in str(e):
            raise CheckpointError(f"{str(path)!r} holds pickled objects, which vitkit refuses to load (they can run "
                                  "code); a Flax .npz holds arrays only") from None
        raise CheckpointError(f"{str(path)!r} is not a readable .npz file ({e}); it may be truncated") from None
    except Exception as e:  # zipfile.BadZipFile, EOFError, OSError: a damaged or foreign file
        raise CheckpointError(f"{str(path)!r} is not a readable .npz file ({type(e).__name__}: {e}); it may be "
                              "truncated — re-download it") from None


def unwrap_state_dict(obj: dict, source: str = "checkpoint") -> Dict[str, torch.Tensor]:
    """Training checkpoints nest the weights (`{'model': ...}` in DeiT/MAE, `{'state_dict': ...}` in timm and
    Lightning) and DDP prefixes keys with `module.`: return the bare tensor dict."""
    for key in ("model", "state_dict", "model_state_dict", "module", "net"):
        inner = obj.get(key)
        if isinstance(inner, dict) and inner and any(isinstance(v, torch.Tensor) for v in inner.values()):
            log.info("%s: using the weights under %r", source, key)
            obj = inner
            break
    state = {k: v for k, v in obj.items() if isinstance(v, torch.Tensor)}
    if not state:
        raise CheckpointError(f"{source} holds no tensors (top-level keys: {sorted(obj)[:8]}); it is not a model "
                              "checkpoint")
    for pre in ("module.", "model."):
        if all(k.startswith(pre) for k in state):
            state = {k[len(pre):]: v for k, v in state.items()}
    return state


def read_weights(path: Path) -> Tuple[Dict[str, object], Dict[str, str]]:
    """One weights file → (name → tensor or array, file metadata)."""
    path = Path(path)
    name = path.name.lower()
    if name.endswith(".safetensors"):
        state, meta = load_safetensors_file(path)
        return unwrap_state_dict(state, str(path)), meta
    if name.endswith(".npz"):
        return load_npz_file(path), {}
    if name.endswith(TORCH_SUFFIXES):
        return unwrap_state_dict(load_torch_file(path), str(path)), {}
    raise CheckpointError(f"{str(path)!r}: unknown weights file type; expected .safetensors, .pth/.pt/.bin or .npz")


def read_folder_weights(folder: Path) -> Dict[str, torch.Tensor]:
    """The weights of a Hugging Face / timm hub folder, sharded (`*.index.json`) or not."""
    for index in ("model.safetensors.index.json", "pytorch_model.bin.index.json"):
        if (folder / index).is_file():
            shards = sorted(set(read_json(folder / index).get("weight_map", {}).values()))
            state = {}
            for shard in shards:
                state.update(read_weights(folder / shard)[0])
            return state
    for cand in WEIGHT_FILES:
        if (folder / cand).is_file():
            return read_weights(folder / cand)[0]
    found = sorted(p.name for p in folder.iterdir())[:10]
    raise CheckpointError(f"folder {str(folder)!r} has no weights file (looked for {', '.join(WEIGHT_FILES)}; "
                          f"found {found}); point at the weights file itself")


def looks_like_hub_name(name: str) -> bool:
    s = str(name)
    if s.startswith(("hf-hub:", "hf_hub:")):
        return True
    parts = s.split("/")
    return len(parts) == 2 and all(parts) and not s.startswith((".", "~")) and not Path(s).suffix.lower() in (
        ".pth", ".pt", ".bin", ".npz", ".safetensors")


def download_from_hub(name: str, revision: Optional[str] = None) -> Path:
    """Fetch a model repo's config and weights (`timm/...`, `google/vit-...`) into the hub cache; return its folder.
    Offline or without huggingface_hub, a one-line error says so."""
    repo = str(name).split(":", 1)[1] if str(name).startswith(("hf-hub:", "hf_hub:")) else str(name)
    try:
        from huggingface_hub import snapshot_download
    except ImportError:
        raise CheckpointError(f"{name!r} looks like a hub name, but huggingface_hub is not installed; "
                              "pip install 'vitkit[hub]', or download the files and pass their path") from None
    patterns = ["*.json", "model.safetensors", "model.safetensors.index.json", "model-*.safetensors"]
    try:  # prefer safetensors; fall back to pytorch_model.bin only when the repo has no safetensors
        folder = Path(snapshot_download(repo, revision=revision, allow_patterns=patterns))
        if not any(folder.glob("*.safetensors")):
            folder = Path(snapshot_download(repo, revision=revision,
                                            allow_patterns=["*.json", "pytorch_model*.bin", "*.npz"]))
    except Exception as e:
        offline = os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes") or \
            type(e).__name__ in ("LocalEntryNotFoundError", "OfflineModeIsEnabled")
        if offline:
            raise CheckpointError(
                f"cannot download {repo!r}: offline (HF_HUB_OFFLINE is set or the hub is unreachable) and it is not "
                "in the local hub cache; connect to the network and unset HF_HUB_OFFLINE, or download the files "
                "elsewhere and pass their local path") from None
        raise CheckpointError(f"cannot download {repo!r} from the Hugging Face hub "
                              f"({type(e).__name__}: {' '.join(str(e).split())[:200]}); check the name, or pass "
                              "a local path") from None
    return folder


# ---- one writer at a time ---------------------------------------------------------------------------------------
class LockHeld(BlockingIOError):
    """`lock_file(..., wait=False)` found the lock held by another process; `pid` is the pid it wrote ('?': none)."""

    def __init__(self, path, pid: str):
        super().__init__(f"{str(path)!r} is locked by process {pid}")
        self.pid = pid


def lock_holder(fd: int) -> str:
    """The pid the lock's holder wrote into the lock file, or '?' before it has."""
    try:
        return os.pread(fd, 32, 0).decode(errors="replace").strip() or "?"
    except OSError:
        return "?"


def write_pid(fd: int) -> None:
    """Sign a lock file taken with `lock_file` with this process's pid, for whoever finds it held."""
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)


def lock_file(path, *, wait: bool, what: str = "") -> Optional[int]:
    """An exclusive OS lock (flock) on the file `path`, made with its folder if missing: returns the descriptor that
    holds it until closed; the OS drops it when its process dies, so a killed holder never leaves it stuck. When
    another process holds it: with `wait`, log its pid (naming `what`) and wait; else raise LockHeld. None where
    fcntl is missing (Windows): nothing is locked there."""
    path = Path(path)
    if fcntl is None:
        path.parent.mkdir(parents=True, exist_ok=True)
        return None
    for _ in range(20):
        path.parent.mkdir(parents=True, exist_ok=True)
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        except FileNotFoundError:  # the folder was removed under us by the lock's previous holder: again
            continue
        try:
            _flock(fd, path, wait, what)
        except BaseException:
            os.close(fd)
            raise
        try:  # the holder before us may have removed the file (with its folder) before we locked it
            same = os.stat(path).st_ino == os.fstat(fd).st_ino
        except FileNotFoundError:
            same = False
        if same:
            return fd
        os.close(fd)
    raise LockHeld(path, "?")


def _flock(fd: int, path: Path, wait: bool, what: str) -> None:
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return
    except OSError:
        pid = lock_holder(fd)
    if wait:
        log.warning("%s is being written by another vitkit process (pid %s); waiting for it to finish",
                    what or path, pid)
        fcntl.flock(fd, fcntl.LOCK_EX)
        return
    for _ in range(20):  # a holder that has just locked writes its pid once its own checks pass
        if pid != "?":
            break
        time.sleep(0.025)
        pid = lock_holder(fd)
    raise LockHeld(path, pid)
