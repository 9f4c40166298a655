"""Collectives for mining: gathers of rows of different counts per rank, integer reductions, the device a
backend's tensors live on, and forwards kept in step for a sharded model (:class:`Lockstep`).

All are the identity in a single process (torch.distributed not initialised).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
import torch.distributed as dist
from torch import Tensor

from muco.losses.gather import all_gather_no_grad, dist_world_size, gather_row_counts


def world() -> tuple[int, int]:
    """(rank, world size); (0, 1) without torch.distributed."""
    n = dist_world_size()
    return (dist.get_rank() if n > 1 else 0), n


def backend_device() -> torch.device:
    """Where the collectives' tensors must live: the current GPU for NCCL, else the CPU."""
    if dist_world_size() > 1 and dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def gather_rows(x: Tensor, dst: int | None = None) -> list[Tensor]:
    """Every rank's ``x`` (same trailing shape and dtype, any row count), in rank order, on the CPU: on every
    rank, or with ``dst`` on that rank only (the others get ``[]``: they need not hold everyone's rows).

    Rows are padded to the largest count for the collective and trimmed afterwards.
    """
    if dist_world_size() == 1:
        return [x.cpu()]
    counts = gather_row_counts(x.shape[0])
    pad = max(counts)
    if pad == 0:
        return [x[:0].cpu() for _ in counts] if dst is None or dist.get_rank() == dst else []
    buf = torch.zeros((pad, *x.shape[1:]), dtype=x.dtype, device=backend_device())
    buf[: x.shape[0]] = x.to(buf.device)
    if dst is None:
        out = all_gather_no_grad(buf).cpu()
        return [out[r * pad : r * pad + n] for r, n in enumerate(counts)]
    if dist.get_rank() != dst:
        dist.gather(buf, None, dst=dst)
        return []
    parts = [torch.empty_like(buf) for _ in counts]
    dist.gather(buf, parts, dst=dst)
    return [p[:n].cpu() for p, n in zip(parts, counts)]


def all_reduce_ints(values: Sequence[int], op: str = "sum") -> list[int]:
    """Element-wise ``sum`` or ``max`` of every rank's ``values`` (same length everywhere); a plain
    collective, so it needs none of the functional-collectives machinery."""
    if dist_world_size() == 1:
        return [int(v) for v in values]
    t = torch.tensor([int(v) for v in values], dtype=torch.long, device=backend_device())
    dist.all_reduce(t, op={"sum": dist.ReduceOp.SUM, "max": dist.ReduceOp.MAX}[op])
    return [int(v) for v in t.tolist()]


def barrier() -> None:
    if dist_world_size() > 1:
        dist.barrier()


class Lockstep:
    """Forwards in step on every rank, for a model sharded with FSDP2 (each forward gathers weights from all
    ranks) while each rank embeds its own share, whose batch count differs between ranks.

    A share of unknown length (a stream of batches): before each real forward a rank calls :meth:`step`; when
    its share is done it calls :meth:`drain`, which runs ``filler`` (one small forward whose result is dropped)
    as long as any other rank is still embedding; one all-reduce of a flag per round. A share of known length:
    :meth:`fillers_after` before its forwards, :meth:`fill` after them. With ``enabled`` False (an unsharded
    model, or one process) all of these are free and ``filler`` never runs.
    """

    def __init__(self, enabled: bool, filler: Callable[[], object]) -> None:
        self.enabled = enabled and dist_world_size() > 1
        self.filler = filler
        self.fillers = 0  # forwards this rank ran only to keep in step

    def _any(self, busy: bool) -> bool:
        return all_reduce_ints([int(busy)], "max")[0] > 0

    def step(self) -> None:
        if self.enabled:
            self._any(True)

    def drain(self) -> None:
        while self.enabled and self._any(False):
            self.fill(1)

    def fillers_after(self, forwards: int) -> int:
        """Before this rank's ``forwards`` forwards: how many fillers it must run after them to match the rank
        with the most."""
        return all_reduce_ints([forwards], "max")[0] - forwards if self.enabled else 0

    def fill(self, n: int) -> None:
        for _ in range(n):
            self.filler()
            self.fillers += 1
