"""Distributed set-up: join the process group torchrun describes (one machine or many, any rendezvous), the few
collectives the engine uses, and who launched this process group (for torchrun's elastic restarts)."""
from __future__ import annotations

import logging
import os
import socket
from dataclasses import dataclass, field
from typing import Optional, Tuple

import torch

from ..runtime import resolve_device

log = logging.getLogger(__name__)


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
        backend = "nccl" if dev.type == "cuda" else "gloo"
        store = _attempt_store(world)
        if store is not None:
            dist.init_process_group(backend, store=store, rank=rank, world_size=world)
        else:
            dist.init_process_group(backend)
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    return DistInfo(rank, world, local, dev)


def _attempt_store(world: int):
    """torchrun's agent keeps one store for all the attempts of a job (TORCHELASTIC_USE_AGENT_STORE), so the workers
    it restarts can read the addresses the dead ones left there and fail to connect, or hang (pytorch#135712). On one
    machine every worker of an attempt has the same restart count: its own key space in the store, then. Across
    machines the counts differ (an agent whose workers did not fail does not count); there, launch with
    TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1 (a fresh store per rendezvous round) when restarts are allowed."""
    if os.environ.get("TORCHELASTIC_USE_AGENT_STORE") != "True":
        return None
    if int(os.environ.get("LOCAL_WORLD_SIZE", "0")) != world:
        if int(os.environ.get("TORCHELASTIC_MAX_RESTARTS", "0")) > 0 and int(os.environ.get("RANK", "0")) == 0:
            log.warning("torchrun shares one store between restarts on several machines: restarted workers may "
                        "not connect (pytorch#135712); launch with TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1")
        return None
    import torch.distributed as dist

    store, _, _ = next(dist.rendezvous("env://"))
    return dist.PrefixStore(f"vitkit.attempt{os.environ.get('TORCHELASTIC_RESTART_COUNT', '0')}", store)


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
