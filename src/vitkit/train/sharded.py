"""Sharded training for the engine (`--strategy fsdp`): FSDP2 `fully_shard` per transformer block and then the
root, the full weights gathered on rank 0 (evaluation, `.safetensors` checkpoints), and the training state saved and
loaded with `torch.distributed.checkpoint` (DCP): one file per process, resharded by DCP on load, so a run written
by N processes resumes in any number, one included."""
from __future__ import annotations

import shutil
import warnings
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator, Optional

import torch
from torch import nn

from ..errors import CheckpointError

SHARDED_DIR = "state.dcp"  # in the run folder: one DCP checkpoint per saved step, step-NNNNNNNNN/


def transformer_blocks(model: nn.Module) -> Iterator[nn.Module]:
    """Each block of the model's block lists (`blocks`, `decoder_blocks`, `encoder.blocks`): FSDP's units."""
    for name, module in model.named_modules():
        if isinstance(module, (nn.ModuleList, nn.Sequential)) and name.rsplit(".", 1)[-1].endswith("blocks"):
            yield from module


def shard_model(model: nn.Module, precision: str = "fp32", device: Optional[torch.device] = None) -> nn.Module:
    """Shard `model` in place over the default process group: each transformer block is one FSDP unit (its weights
    gathered just before it runs), the root holds the rest. On GPUs with bf16, a MixedPrecisionPolicy gathers the
    weights in bf16 (half the traffic) and reduces gradients in fp32; elsewhere the weights stay as they are."""
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    block_kw, root_kw = {}, {}
    if device is not None and device.type == "cuda" and precision == "bf16":
        block_kw["mp_policy"] = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
        root_kw["mp_policy"] = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32,
                                                    output_dtype=torch.float32)  # the loss sees fp32 outputs
    for block in list(transformer_blocks(model)):
        fully_shard(block, **block_kw)
    fully_shard(model, **root_kw)
    return model


def gather_full(src: nn.Module, dst: Optional[nn.Module]) -> None:
    """Every rank calls this: the full weights of the sharded `src` land in `dst` (rank 0's plain copy; None on
    the other ranks), moved through the CPU so no rank holds two full copies on its device."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    sd = get_model_state_dict(src, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if dst is not None:
        dst.load_state_dict(sd)


@contextmanager
def _one_process_is_fine():
    """DCP warns when it reads or writes without a process group; for a run in one process that is the intent."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled, unavailable or uninitialized")
        yield


def _states(model: nn.Module, optimizer: torch.optim.Optimizer, ema: Optional[nn.Module]) -> dict:
    from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_state_dict

    msd, osd = get_state_dict(model, optimizer)
    state = {"model": msd, "optim": osd}
    if ema is not None:
        state["ema"] = get_model_state_dict(ema)
    return state


def save_sharded(path: Path, model: nn.Module, optimizer: torch.optim.Optimizer,
                 ema: Optional[nn.Module] = None) -> None:
    """Every rank writes its shards of the weights, optimizer state and EMA to the DCP folder `path` (a shared
    filesystem when the ranks are on several machines); the metadata file, written last, makes it complete."""
    import torch.distributed.checkpoint as dcp

    with _one_process_is_fine():
        dcp.save(_states(model, optimizer, ema), checkpoint_id=str(path))


def load_sharded(path: Path, model: nn.Module, optimizer: torch.optim.Optimizer,
                 ema: Optional[nn.Module] = None) -> None:
    """The state `save_sharded` wrote, loaded into this process's shards (any number of processes, sharded or not)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import set_model_state_dict, set_state_dict

    if not (Path(path) / ".metadata").is_file():
        raise CheckpointError(f"cannot resume: the sharded checkpoint {str(path)!r} is missing or incomplete (no "
                              ".metadata); the run folder was damaged, start the run again without --resume")
    state = _states(model, optimizer, ema)
    try:
        with _one_process_is_fine():
            dcp.load(state, checkpoint_id=str(path))
    except Exception as e:  # DCP wraps every rank's failure in one CheckpointException
        first = next((ln for ln in str(e).splitlines() if ln.strip()), type(e).__name__)
        raise CheckpointError(f"cannot resume from the sharded checkpoint {str(path)!r}: {first[:300]}; resume it "
                              "with the options it was trained with") from None
    set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"])
    if ema is not None:
        set_model_state_dict(ema, state["ema"])


def prune_sharded(run_path: Path, keep: str) -> None:
    """Remove the run's DCP checkpoints other than `keep` (a path relative to the run folder): older steps, and
    half-written ones a killed process left behind."""
    root = Path(run_path) / SHARDED_DIR
    if not root.is_dir():
        return
    for d in root.iterdir():
        if d.relative_to(run_path).as_posix() != keep:
            shutil.rmtree(d, ignore_errors=True) if d.is_dir() else d.unlink()
