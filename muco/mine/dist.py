"""Gathers for mining: rows of different counts per rank, and small Python objects.

All are the identity in a single process (torch.distributed not initialised).
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor

from muco.losses.gather import all_gather_no_grad, dist_world_size, gather_row_counts


def world() -> tuple[int, int]:
    """(rank, world size); (0, 1) without torch.distributed."""
    n = dist_world_size()
    return (dist.get_rank() if n > 1 else 0), n


def _backend_device() -> torch.device:
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def gather_rows(x: Tensor) -> list[Tensor]:
    """Every rank's ``x`` (same trailing shape and dtype, any row count), in rank order, on the CPU.

    Rows are padded to the largest count for the collective and trimmed afterwards.
    """
    if dist_world_size() == 1:
        return [x.cpu()]
    counts = gather_row_counts(x.shape[0])
    pad = max(counts)
    if pad == 0:
        return [x[:0].cpu() for _ in counts]
    buf = torch.zeros((pad, *x.shape[1:]), dtype=x.dtype, device=_backend_device())
    buf[: x.shape[0]] = x.to(buf.device)
    out = all_gather_no_grad(buf).cpu()
    return [out[r * pad : r * pad + n] for r, n in enumerate(counts)]


def barrier() -> None:
    if dist_world_size() > 1:
        dist.barrier()
