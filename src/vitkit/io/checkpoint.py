"""vitkit's own checkpoint format: safetensors weights whose metadata carries the model config, the class names
and the preprocessing, so a file rebuilds its own model with no other input. Nothing here unpickles.

Metadata keys (all JSON strings): `format` = "vitkit", `version`, `model_type` (e.g. "vit"), `config`,
`pretrained_cfg` (class_names, mean, std, interpolation, crop_pct, input_size and anything else that travels).
Written by training: `epoch`, `step`, `run`, `metrics` (the latest epoch's row) at every save, and `report` (a
compact summary of the run's report.json: held-out top-1/top-5, epochs, steps, time, data, date, vitkit version)
when the run ends, so a checkpoint copied out of its run folder still says how it was trained.
"""
from __future__ import annotations

import contextlib
import fnmatch
import json
import os
import tempfile
import time
from pathlib import Path
from typing import Callable, Dict, Optional, Tuple, Type

from torch import nn

from ..errors import CheckpointError
from ..models import Preprocessing
from ..models.registry import MODEL_TYPES, model_type_of, register_model_type  # noqa: F401 (register: re-exported)

FORMAT = "vitkit"
FORMAT_VERSION = "1"
RUN_CHECKPOINTS = ("best.safetensors", "last.safetensors", "model.safetensors")  # what a run folder loads, in order


def _model_type(model: nn.Module) -> str:
    name = model_type_of(model)
    if name is not None:
        return name
    raise CheckpointError(f"cannot save a {type(model).__name__}: vitkit checkpoints hold {sorted(MODEL_TYPES)} models")


def atomic_write(path: Path, write: Callable[[str], None]) -> None:
    """Write through a temp file in the same folder, then rename: a kill at any moment leaves the old file whole.
    Test hook: VITKIT_TEST_PAUSE_WRITE=<file-name glob>:<seconds> sleeps between a matching temp file's last byte
    and its rename, so a test can kill a process inside a write (VITKIT_TEST_PAUSE_UNTIL=<file> ends the pause as
    soon as that file exists, so a race test holds a writer exactly as long as it needs, whatever the machine's
    speed); unset (always, outside tests) it does nothing."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        write(tmp)
        pause = os.environ.get("VITKIT_TEST_PAUSE_WRITE")
        if pause:
            pattern, _, seconds = pause.rpartition(":")
            if fnmatch.fnmatch(path.name, pattern):
                until, end = os.environ.get("VITKIT_TEST_PAUSE_UNTIL"), time.monotonic() + float(seconds)
                while time.monotonic() < end and not (until and os.path.exists(until)):
                    time.sleep(min(0.02, max(0.0, end - time.monotonic())))
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def save(model: nn.Module, path, class_names=None, pretrained_cfg: Optional[dict] = None,
         extra: Optional[dict] = None) -> Path:
    """Save `model` as a self-describing safetensors file (written atomically). `class_names` and
    `pretrained_cfg` default to what the model carries (`model.pretrained_cfg`)."""
    from safetensors.torch import save_file

    path = Path(path)
    recorded = {**(getattr(model, "pretrained_cfg", None) or {}), **(pretrained_cfg or {})}
    if class_names is not None:
        recorded["class_names"] = list(class_names)
    try:
        pcfg = Preprocessing.from_dict(recorded, model.config).to_dict()  # what is not recorded: the defaults
    except ValueError as e:
        raise CheckpointError(f"cannot save {str(path)!r}: {e}; correct model.pretrained_cfg") from None
    meta = {
        "format": FORMAT,
        "version": FORMAT_VERSION,
        "model_type": _model_type(model),
        "config": json.dumps(model.config.to_dict()),
        "pretrained_cfg": json.dumps(pcfg),
    }
    for k, v in (extra or {}).items():
        meta[k] = v if isinstance(v, str) else json.dumps(v)
    # safetensors refuses shared or non-contiguous storage: give each tensor its own contiguous copy.
    tensors = {k: v.detach().to("cpu").contiguous().clone() for k, v in model.state_dict().items()}
    atomic_write(path, lambda tmp: save_file(tensors, tmp, metadata=meta))
    return path


def read_metadata(path) -> Dict[str, str]:
    """The metadata of a safetensors file, or a clear error if it is not one."""
    from safetensors import safe_open

    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {str(path)!r} does not exist; check the path")
    try:
        with safe_open(str(path), framework="pt") as f:
            return dict(f.metadata() or {})
    except Exception as e:  # safetensors raises its own error types for a truncated or foreign file
        raise CheckpointError(
            f"{str(path)!r} is not a readable safetensors file ({str(e).splitlines()[0]}); it may be truncated "
            "or of another format: use vitkit.load_pretrained for timm/HF/npz/torchvision files"
        ) from None


def is_vitkit_checkpoint(path) -> bool:
    path = Path(path)
    if path.suffix != ".safetensors" or not path.is_file():
        return False
    try:
        return read_metadata(path).get("format") == FORMAT
    except CheckpointError:
        return False


def _vitkit_metadata(path) -> Tuple[Path, Dict[str, str]]:
    """The checkpoint file (a run folder's best, last or model.safetensors) and its vitkit metadata."""
    path = Path(path)
    if path.is_dir():
        for cand in RUN_CHECKPOINTS:
            if (path / cand).is_file():
                path = path / cand
                break
        else:
            raise CheckpointError(f"{str(path)!r} is a folder with no best/last/model.safetensors in it; "
                                  "point at a checkpoint file or a finished run folder")
    meta = read_metadata(path)
    if meta.get("format") != FORMAT:
        raise CheckpointError(f"{str(path)!r} is a safetensors file but not a vitkit checkpoint (no vitkit metadata); "
                              "load it with vitkit.load_pretrained(path), which converts timm/HF layouts")
    return path, meta


def read_pretrained_cfg(path) -> dict:
    """A vitkit checkpoint's (or run folder's) pretrained_cfg: class names, preprocessing, dataset. Read from the
    metadata alone, without building the model."""
    path, meta = _vitkit_metadata(path)
    try:
        pcfg = json.loads(meta.get("pretrained_cfg", "{}"))
    except ValueError as e:
        raise CheckpointError(f"{str(path)!r} has damaged vitkit metadata ({e}); re-save it") from None
    if not isinstance(pcfg, dict):
        raise CheckpointError(f"{str(path)!r} has damaged vitkit metadata (pretrained_cfg is a "
                              f"{type(pcfg).__name__}); re-save it")
    return pcfg


def add_metadata(path, extra: Dict[str, object]) -> None:
    """Add or replace metadata entries of a vitkit checkpoint (values JSON-encoded unless strings), rewriting it
    atomically with the same tensors: how a run's final report joins weights that were saved before it existed."""
    from safetensors.torch import load_file, save_file

    path, meta = _vitkit_metadata(path)
    tensors = load_file(str(path))
    meta.update({k: v if isinstance(v, str) else json.dumps(v) for k, v in extra.items()})
    atomic_write(path, lambda tmp: save_file(tensors, tmp, metadata=meta))


def read_training(path) -> dict:
    """What a vitkit checkpoint (or run folder) says about the training that made it, from its metadata alone: the
    run's compact report when the run finished (`report`), else the epoch, step, run name and latest metrics every
    save records (a run stopped early, or a checkpoint older than `report`); {} when it holds none (not trained by
    vitkit's engine). Damaged entries are left out rather than refusing a loadable checkpoint."""
    _, meta = _vitkit_metadata(path)

    def entry(key):
        try:
            return json.loads(meta[key])
        except (KeyError, ValueError):
            return None

    report = entry("report")
    if isinstance(report, dict):
        return report
    out = {"run": meta.get("run"), "epoch": entry("epoch"), "steps": entry("step")}
    metrics = entry("metrics")
    if isinstance(metrics, dict):
        out["metrics"] = {k: v for k, v in metrics.items() if isinstance(v, (int, float))}
    return {k: v for k, v in out.items() if v not in (None, {})}


def load(path, map_location="cpu") -> nn.Module:
    """Rebuild the model a vitkit checkpoint describes and load its weights (strict). The returned model
    carries `model.pretrained_cfg` (class names, preprocessing). A run folder loads its best checkpoint."""
    from safetensors.torch import load_file

    path, meta = _vitkit_metadata(path)
    mtype = meta.get("model_type", "vit")
    if mtype not in MODEL_TYPES:
        raise CheckpointError(f"{str(path)!r} holds a {mtype!r} model, which this vitkit does not know "
                              f"(known: {sorted(MODEL_TYPES)}); upgrade vitkit")
    config_cls, model_cls = MODEL_TYPES[mtype]
    try:
        config = config_cls.from_dict(json.loads(meta["config"]))
        pcfg = json.loads(meta.get("pretrained_cfg", "{}"))
        Preprocessing.from_dict(pcfg, config)  # refuses an entry the tasks could not use
    except (KeyError, ValueError, TypeError, AttributeError) as e:
        raise CheckpointError(f"{str(path)!r} has damaged vitkit metadata ({e}); re-save it") from None
    check_shapes(path, model_cls, config)  # before a byte of the model is allocated
    try:
        model = model_cls(config)
    except (ValueError, TypeError, AttributeError) as e:
        raise CheckpointError(f"{str(path)!r} has damaged vitkit metadata ({e}); re-save it") from None
    try:
        state = load_file(str(path), device=str(map_location))
    except Exception as e:
        raise CheckpointError(f"{str(path)!r} could not be read ({str(e).splitlines()[0]}); it may be truncated") \
            from None
    load_state_dict_checked(model, state, source=str(path))  # also refuses NaN or infinite weights
    model.pretrained_cfg = pcfg
    return model.eval()


def load_vit(path, what: str, map_location="cpu") -> nn.Module:
    """`load` for a command that reads a ViT (classify, embed, explain, fine-tune, export): an MAE gives its encoder;
    any other model (a DiT) is a one-line CheckpointError saying what the file holds, not a traceback later."""
    from ..models import VisionTransformer
    from ..models.mae import encoder_of

    model = encoder_of(load(path, map_location))
    if not isinstance(model, VisionTransformer):
        raise CheckpointError(f"{str(path)!r} holds a {type(model).__name__}, not a ViT; {what} needs a ViT "
                              "checkpoint (a classifier, or an MAE whose encoder it takes)")
    return model


@contextlib.contextmanager
def _no_init():
    """torch.nn.init's fillers as no-ops while a model is built on the meta device (as transformers'
    `no_init_weights` does): random init of meta tensors would import torch's reference ops, a second of nothing."""
    import torch

    names = [n for n in ("uniform_", "normal_", "trunc_normal_", "constant_", "zeros_", "ones_", "xavier_uniform_",
                         "xavier_normal_", "kaiming_uniform_", "kaiming_normal_", "orthogonal_", "eye_", "dirac_")
             if hasattr(torch.nn.init, n)]
    saved = {n: getattr(torch.nn.init, n) for n in names}
    for n in names:
        setattr(torch.nn.init, n, lambda tensor, *args, **kwargs: tensor)
    try:
        yield
    finally:
        for n, f in saved.items():
            setattr(torch.nn.init, n, f)


def check_shapes(path, model_cls: Type[nn.Module], config) -> None:
    """Refuse a checkpoint whose config does not describe its own tensors, by building the model on the meta device
    (no memory) and comparing shapes with the file's header: a forged or damaged config (embed_dim=2**20) fails here
    in a moment instead of allocating terabytes."""
    import torch
    from safetensors import safe_open

    try:
        with torch.device("meta"), _no_init():
            expected = {k: tuple(v.shape) for k, v in model_cls(config).state_dict().items()}
    except (ValueError, TypeError, RuntimeError, AttributeError) as e:
        raise CheckpointError(f"{str(path)!r} has a config that builds no model ({str(e).splitlines()[0]}); "
                              "re-save the checkpoint from its model") from None
    with safe_open(str(path), framework="pt") as f:
        found = {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
    bad = [f"{k} {found[k]} vs config {expected[k]}" for k in expected if k in found and found[k] != expected[k]]
    missing = [k for k in expected if k not in found]
    if bad or missing:
        what = f"shape mismatch for {', '.join(bad[:3])}" if bad else f"missing tensors {', '.join(missing[:3])}"
        raise CheckpointError(f"{str(path)!r}: its config does not match its own tensors ({what}); the file is "
                              "damaged or was edited: re-save it from its model")


def check_finite(state: dict, source: str) -> None:
    """Refuse weights with NaN or infinite values (a diverged or damaged checkpoint), naming the file and tensors."""
    import torch

    bad = [k for k, v in state.items() if torch.is_tensor(v) and v.is_floating_point() and not torch.isfinite(v).all()]
    if bad:
        raise CheckpointError(f"{source} has NaN or infinite weights in {', '.join(bad[:5])}"
                              f"{f' (+{len(bad) - 5} more)' if len(bad) > 5 else ''}; it would predict nothing "
                              "meaningful: use an earlier checkpoint or retrain")


def check_finite_outputs(out, source: str, inputs) -> None:
    """Refuse model outputs (B, ...) with NaN or infinite values, naming the checkpoint and the first input."""
    import torch

    bad = ~torch.isfinite(out.reshape(out.shape[0], -1)).all(dim=1)
    if bool(bad.any()):
        rows = [str(inputs[i]) for i in torch.nonzero(bad).flatten().tolist()]
        raise CheckpointError(f"{source} gives NaN or infinite outputs for {rows[0]!r}"
                              f"{f' (+{len(rows) - 1} more)' if len(rows) > 1 else ''}; its weights overflow at this "
                              "precision or are damaged: use another checkpoint, or fp32")


def load_state_dict_checked(model: nn.Module, state: dict, source: str = "checkpoint", strict: bool = True):
    """load_state_dict with errors that name the missing, unexpected and mis-shaped keys."""
    own = model.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    bad_shape = [f"{k} {tuple(state[k].shape)} vs model {tuple(own[k].shape)}"
                 for k in own if k in state and tuple(state[k].shape) != tuple(own[k].shape)]

    def _few(xs):
        return ", ".join(xs[:5]) + (f" (+{len(xs) - 5} more)" if len(xs) > 5 else "")

    if bad_shape:
        raise CheckpointError(f"{source} does not match the model: shape mismatch for {_few(bad_shape)}; "
                              "build the model the checkpoint was saved from, or load with vitkit.load_pretrained "
                              "to resample")
    check_finite(state, source)
    if strict and (missing or unexpected):
        parts = []
        if missing:
            parts.append(f"missing keys {_few(missing)}")
        if unexpected:
            parts.append(f"unexpected keys {_few(unexpected)}")
        raise CheckpointError(f"{source} does not match the model: {'; '.join(parts)}")
    return model.load_state_dict(state, strict=strict)

