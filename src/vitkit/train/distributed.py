"""Distributed set-up: join the process group torchrun describes (one machine or many, any rendezvous), the few
collectives the engine uses, and who launched this process group (for torchrun's elastic restarts)."""
from __future__ import annotations

import os
import socket
from dataclasses import dataclass, field
from typing import Optional

import torch

from ..runtime import resolve_device


@dataclass
class DistInfo:
    rank: int = 0
    world: int = 1
    local_rank: int = 0
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))

    @property
    def is_main(self) -> bool:
        return self.rank == 0


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


def broadcast_obj(obj, dist_info: DistInfo):
    """Rank 0's `obj` on every rank (unchanged in a single process)."""
    if dist_info.world <= 1:
        return obj
    import torch.distributed as dist

    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def all_gather_obj(obj, dist_info: DistInfo) -> list:
    """Every rank's `obj`, in rank order, on every rank ([obj] in a single process)."""
    if dist_info.world <= 1:
        return [obj]
    import torch.distributed as dist

    out = [None] * dist_info.world
    dist.all_gather_object(out, obj)
    return out


def launch_identity(dist_info: DistInfo) -> Optional[dict]:
    """Under torchrun (every rank calls it): the launch this process group belongs to — its rendezvous id and the
    torchrun agents (host:pid, each worker's parent) of all ranks. The agents outlive the restarts of their workers
    (`--max-restarts`, or a node joining), so a restarted group recognises the run folder its first attempt made.
    None outside torchrun."""
    if "TORCHELASTIC_RUN_ID" not in os.environ:
        return None
    agents = all_gather_obj(f"{socket.gethostname()}:{os.getppid()}", dist_info)
    return {"run_id": os.environ["TORCHELASTIC_RUN_ID"], "agents": sorted(set(agents))}


def barrier(dist_info: DistInfo) -> None:
    """Wait until every rank gets here (nothing to wait for in a single process)."""
    if dist_info.world > 1:
        import torch.distributed as dist

        dist.barrier()
