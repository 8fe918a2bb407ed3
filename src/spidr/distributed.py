"""Collective helpers that degrade to no-ops in a single process.

Model code calls these instead of ``torch.distributed`` so that it never needs a process group: without one
(a laptop, a test, inference) every helper returns its input unchanged.
"""

from __future__ import annotations

import torch
import torch.distributed as dist


class RaisedOnEveryRankError(Exception):
    """Marks an error that every rank raises at the same point, decided from a collective (so the ranks may still
    meet in a barrier while tearing down, which an error on one rank alone cannot allow)."""


class AgreedValueError(RaisedOnEveryRankError, ValueError):
    """A ``ValueError`` raised by every rank at once (e.g. too many unusable files over all ranks)."""


def is_distributed() -> bool:
    """True when a process group with more than one rank is initialised."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def world_size() -> int:
    return dist.get_world_size() if is_distributed() else 1


def rank() -> int:
    return dist.get_rank() if is_distributed() else 0


def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    """Sum ``tensor`` over all ranks in place and return it (identity without a process group)."""
    if is_distributed():
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


def all_gather_objects(value: object) -> list[object]:
    """Every rank's ``value`` (picklable; the job's own data only), in rank order (``[value]`` alone)."""
    if not is_distributed():
        return [value]
    gathered: list[object] = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, value)
    return gathered
