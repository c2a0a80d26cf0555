"""Distributed set-up: join the process group torchrun describes, and the two collectives the engine uses."""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Optional, Tuple

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


def rank_range(n: int, dist_info: DistInfo) -> Tuple[int, int]:
    """This rank's contiguous part [lo, hi) of n items: near-equal parts in rank order, so the parts concatenated in
    rank order are 0..n-1 again (how distributed eval and embed split their data)."""
    per, extra = divmod(n, dist_info.world)
    lo = dist_info.rank * per + min(dist_info.rank, extra)
    return lo, lo + per + (dist_info.rank < extra)


def all_gather_obj(obj, dist_info: DistInfo) -> list:
    """Every rank's `obj` in rank order, on every rank (`[obj]` in a single process). For small objects: sums,
    counts; `gather_obj` brings large ones to rank 0 only."""
    if dist_info.world <= 1:
        return [obj]
    import torch.distributed as dist

    out = [None] * dist_info.world
    dist.all_gather_object(out, obj)
    return out


def gather_obj(obj, dist_info: DistInfo) -> Optional[list]:
    """Every rank's `obj` in rank order on rank 0, None on the others (`[obj]` in a single process)."""
    if dist_info.world <= 1:
        return [obj]
    import torch.distributed as dist

    out = [None] * dist_info.world if dist_info.is_main else None
    dist.gather_object(obj, out, dst=0)
    return out


def barrier(dist_info: DistInfo) -> None:
    """Wait until every rank gets here (nothing to wait for in a single process)."""
    if dist_info.world > 1:
        import torch.distributed as dist

        dist.barrier()
