"""DistributedDataParallel under ``torchrun`` (gloo on CPU, NCCL on GPU).

``torchrun --nproc-per-node N -m dacnn train ...`` sets ``RANK``/``WORLD_SIZE``/``LOCAL_RANK``;
:func:`init_distributed` reads them. Every rank builds the same loader (same seed, same order and
augmentation) and keeps its slice ``x[rank::world]`` of each global batch (:func:`shard_batch`),
so the global batch and the data order do not depend on the number of processes, and rank 0
alone writes files. Shared kernels are one ``nn.Parameter`` each and are reduced once; parameters
a model registers but never uses are found by a probe before wrapping (``find_unused_parameters``
only when needed; ``docs/reference/PITFALLS.md`` item 6).
"""

from __future__ import annotations

import copy
import gc
import os
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from dacnn.errors import ConfigError

__all__ = ["DistContext", "init_distributed", "shard_batch", "wrap_ddp", "has_unused_parameters",
           "all_reduce_sum", "broadcast_object", "cleanup"]


@dataclass(frozen=True)
class DistContext:
    """Rank, world size and local rank; ``world == 1`` means no process group."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def enabled(self) -> bool:
        return self.world > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        if self.enabled:
            dist.barrier()


def init_distributed(device: torch.device) -> DistContext:
    """Join the process group torchrun describes (or return a single-process context)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return DistContext()
    rank, local_rank = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    if not dist.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        if device.type == "cuda":
            torch.cuda.set_device(local_rank)
        dist.init_process_group(backend=backend)
    return DistContext(rank=rank, world=world, local_rank=local_rank)


def cleanup(ctx: DistContext, *, clean_exit: bool = True) -> None:
    """Tear the process group down. On a clean exit every rank first meets at a barrier and drops
    unreachable DDP reducers (``gc.collect``), so no gloo work is still in flight when the group is
    destroyed: destroying it under a pending work aborts the process ("terminate called without an
    active exception", SIGABRT). After an error the barrier is skipped (a dead peer would hang it)."""
    if ctx.enabled and dist.is_initialized():
        if clean_exit:
            dist.barrier()
        gc.collect()
        dist.destroy_process_group()


def shard_batch(x: torch.Tensor, y: torch.Tensor, ctx: DistContext) -> tuple[torch.Tensor, torch.Tensor]:
    """This rank's part ``[rank::world]`` of a global batch."""
    if not ctx.enabled:
        return x, y
    return x[ctx.rank :: ctx.world], y[ctx.rank :: ctx.world]


def check_batch_size(batch_size: int, ctx: DistContext) -> None:
    if batch_size % ctx.world:
        raise ConfigError(f"batch_size {batch_size} is not divisible by the {ctx.world} processes")


def has_unused_parameters(model: nn.Module, input_size: tuple[int, ...]) -> bool:
    """Probe a copy with one forward/backward: does any trainable parameter get no gradient?"""
    probe = copy.deepcopy(model).train()
    param = next(probe.parameters(), None)
    device = param.device if param is not None else torch.device("cpu")
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):  # dropout: keep RNG
        out = probe(torch.zeros(2, *input_size, device=device))
        out.float().sum().backward()
    return any(p.grad is None for p in probe.parameters() if p.requires_grad)


def wrap_ddp(model: nn.Module, ctx: DistContext, device: torch.device,
             input_size: tuple[int, ...]) -> nn.Module:
    """``DistributedDataParallel(model)`` with ``find_unused_parameters`` set by a probe."""
    if not ctx.enabled:
        return model
    unused = has_unused_parameters(model, input_size)
    ids = [device.index] if device.type == "cuda" else None
    return nn.parallel.DistributedDataParallel(model, device_ids=ids, find_unused_parameters=unused)


def all_reduce_sum(values: list[float], ctx: DistContext, device: torch.device) -> list[float]:
    """Sum a few numbers over ranks (identity in a single process)."""
    if not ctx.enabled:
        return values
    t = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t.tolist()


def broadcast_object(obj: Any, ctx: DistContext) -> Any:
    """Rank 0's ``obj`` on every rank (identity in a single process)."""
    if not ctx.enabled:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]
