"""The collective operations effsr uses outside Lightning's strategy (identity in a single process).

Methods and the evaluation exchange Python objects (records, split scores) and, for ClassSR's L_avg, tensors
with their gradients; every helper here is a no-op when ``torch.distributed`` is not initialised, so the same
code runs in one process and under DDP. Each call is a collective: every rank must make it.
"""

from __future__ import annotations

from typing import Any, TypeVar

import torch
import torch.distributed as dist
from torch import Tensor

__all__ = ["all_gather_objects", "broadcast_object", "gather_with_grad", "is_distributed", "rank", "world_size"]

T = TypeVar("T")


def is_distributed() -> bool:
    """Whether a ``torch.distributed`` process group is initialised."""
    return dist.is_available() and dist.is_initialized()


def rank() -> int:
    """This process's global rank (0 in a single process)."""
    return dist.get_rank() if is_distributed() else 0


def world_size() -> int:
    """Number of processes (1 in a single process)."""
    return dist.get_world_size() if is_distributed() else 1


def broadcast_object(value: T, src: int = 0) -> T:
    """``value`` of rank ``src`` on every rank (picklable objects)."""
    if not is_distributed():
        return value
    holder = [value]
    dist.broadcast_object_list(holder, src=src)
    return holder[0]


def all_gather_objects(value: T) -> list[T]:
    """Every rank's ``value``, in rank order (``[value]`` in a single process)."""
    if world_size() == 1:
        return [value]
    gathered: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, value)
    return gathered


def gather_with_grad(tensor: Tensor) -> Tensor:
    """``tensor`` of all ranks concatenated along dim 0, gradients flowing back to each rank's part."""
    if not is_distributed():
        return tensor
    from torch.distributed.nn.functional import all_gather

    return torch.cat(all_gather(tensor), dim=0)
