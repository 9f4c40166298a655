"""Process-group helpers every layer may use (data, train, mine): rank, world size, object gathers.

All are the identity in a single process (torch.distributed not initialised).
"""

from __future__ import annotations

from typing import Any

import torch.distributed as dist


def rank_world() -> tuple[int, int]:
    """(rank, world size) of the default process group; (0, 1) without one."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def gather_objects(obj: Any) -> list[Any]:
    """Every rank's picklable ``obj``, in rank order (a collective: every rank must call it)."""
    _, world = rank_world()
    if world == 1:
        return [obj]
    out: list[Any] = [None] * world
    dist.all_gather_object(out, obj)
    return out
