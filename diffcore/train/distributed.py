"""torch.distributed helpers for DDP training launched by torchrun (NCCL on GPU, gloo on CPU)."""
from __future__ import annotations

import os
from typing import Any

import torch
import torch.distributed as dist

from ..data import distributed_info


def init_distributed(backend: "str | None" = None) -> tuple[int, int]:
    """Initialise the default process group from torchrun's environment (``WORLD_SIZE``, ``RANK``, ``LOCAL_RANK``,
    ``MASTER_ADDR``, ``MASTER_PORT``) when ``WORLD_SIZE > 1`` and no group exists yet; on CUDA also selects the
    device ``cuda:LOCAL_RANK``. ``backend`` defaults to NCCL with CUDA, gloo without. Returns ``(rank, world)``."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1 and dist.is_available() and not dist.is_initialized():
        use_cuda = torch.cuda.is_available()
        if use_cuda:
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        dist.init_process_group(backend or ("nccl" if use_cuda else "gloo"))
    return distributed_info()


def default_device() -> torch.device:
    """``cuda:LOCAL_RANK`` when CUDA is available, else the CPU."""
    if torch.cuda.is_available():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    return torch.device("cpu")


def gather_in_global_order(local: torch.Tensor) -> torch.Tensor:
    """All-gather ``local`` ``[K, b]`` from every rank into ``[K, world * b]`` ordered as the global batch of
    :class:`diffcore.data.ShardedBatches` (global position ``j * world + rank`` for local position ``j``).
    Identity without a process group."""
    rank, world = distributed_info()
    if world == 1:
        return local
    parts = [torch.empty_like(local) for _ in range(world)]
    dist.all_gather(parts, local.contiguous())
    return torch.stack(parts, dim=-1).reshape(local.shape[0], -1)


def any_rank(flag: bool, device: torch.device) -> bool:
    """True on every rank when ``flag`` is True on at least one (an all-reduce; just ``flag`` without a group)."""
    rank, world = distributed_info()
    if world == 1:
        return flag
    value = torch.tensor([1.0 if flag else 0.0], device=device)
    dist.all_reduce(value, op=dist.ReduceOp.MAX)
    return bool(value.item() > 0)


def gather_objects(obj: Any) -> list[Any]:
    """Every rank's ``obj`` (pickled through the process group), in rank order; ``[obj]`` without a group."""
    rank, world = distributed_info()
    if world == 1:
        return [obj]
    out: list[Any] = [None] * world
    dist.all_gather_object(out, obj)
    return out
