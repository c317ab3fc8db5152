"""torchrun support: the one place that joins (and leaves) the process group, and the few collectives the
loop and nightly retraining need.

Why one: `chromobatch train` and `chromobatch train --db` run unchanged under torchrun, and retraining
joins the group before training (rank 0 takes the lock and tells the others). Both must pick the same
backend for the same --device (nccl on CUDA, gloo on the CPU; the device itself comes from
`ml.device.resolve_device`), and whoever created the group destroys it.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

from chromobatch.ml.device import resolve_device


@dataclass
class DistContext:
    """This process's place in a torchrun job; the defaults are a plain single-process run."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0
    active: bool = False
    #: we initialised the process group and must destroy it (`shutdown`)
    owned: bool = False

    @property
    def main(self) -> bool:
        return self.rank == 0


def init_distributed(device: str) -> DistContext:
    """torchrun sets RANK/LOCAL_RANK/WORLD_SIZE: join the group (nccl on CUDA, gloo on CPU), or reuse the one
    a caller (retraining) joined already. Without torchrun's variables: a single process, no group."""
    if "LOCAL_RANK" not in os.environ or "WORLD_SIZE" not in os.environ:
        return DistContext()
    local = int(os.environ["LOCAL_RANK"])
    owned = False
    if not dist.is_initialized():
        use_cuda = resolve_device(device, local).type == "cuda"
        if use_cuda:
            torch.cuda.set_device(local)
        dist.init_process_group(backend="nccl" if use_cuda else "gloo")
        owned = True
    return DistContext(rank=dist.get_rank(), world=dist.get_world_size(), local_rank=local, active=True,
                       owned=owned)


def shutdown(ctx: DistContext) -> None:
    """Destroy the process group if `init_distributed` created it for this context."""
    if ctx.owned and dist.is_initialized():
        dist.destroy_process_group()


def broadcast_object(value: Any, ctx: DistContext) -> Any:
    """Rank 0's `value` on every rank (any picklable object)."""
    if not ctx.active or ctx.world == 1:
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def broadcast_tensor(t: torch.Tensor, ctx: DistContext, device: torch.device) -> torch.Tensor:
    """Rank 0's values of a small CPU tensor on every rank (on the device for nccl), so all ranks decide alike."""
    if not ctx.active:
        return t
    t = t.to(device) if device.type == "cuda" else t
    dist.broadcast(t, src=0)
    return t


def gather_dicts(part: dict[str, Any], ctx: DistContext) -> dict[str, Any]:
    """Every rank's `part` merged into one dict (each rank contributes its own keys)."""
    if not ctx.active:
        return dict(part)
    gathered: list[Any] = [None] * ctx.world
    dist.all_gather_object(gathered, part)
    return {k: v for g in gathered for k, v in g.items()}


def barrier(ctx: DistContext) -> None:
    if ctx.active:
        dist.barrier()


def wrap_model(net: torch.nn.Module, ctx: DistContext, device: torch.device) -> torch.nn.Module:
    """`net` inside DistributedDataParallel in a torchrun job (gradients averaged over ranks), else itself."""
    if not ctx.active:
        return net
    return torch.nn.parallel.DistributedDataParallel(net, device_ids=[device.index] if device.type == "cuda" else None)
