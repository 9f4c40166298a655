"""Cross-rank gathers for contrastive losses.

All gathers concatenate along dim 0 over a process group (default: the world group) and are the identity when
``torch.distributed`` is not initialised or the group has one rank, so the losses run unchanged in a single
process.

Requirement: every rank must contribute the same number of rows. A size mismatch inside the collective is
not an exception but a hard abort of the process (gloo) or a hang / garbage (NCCL), so callers check sizes
first with :func:`rank_offset` (or :func:`gather_row_counts`), which turns it into a clear ``ValueError`` on
every rank. Drop the last partial batch, or pad with masked rows, to satisfy it.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor
from torch.distributed import ProcessGroup

__all__ = [
    "all_gather_no_grad",
    "all_gather_with_grad",
    "dist_world_size",
    "gather_row_counts",
    "rank_offset",
]


def _group(group: ProcessGroup | None) -> ProcessGroup:
    return dist.group.WORLD if group is None else group


def dist_world_size(group: ProcessGroup | None = None) -> int:
    """World size of ``group``; 1 when torch.distributed is unavailable or not initialised."""
    if not (dist.is_available() and dist.is_initialized()):
        return 1
    return dist.get_world_size(_group(group))


def _dist_rank(group: ProcessGroup | None = None) -> int:
    if dist_world_size(group) == 1:
        return 0
    return dist.get_rank(_group(group))


def _check_rows(x: Tensor) -> None:
    if x.dim() == 0:
        raise ValueError("gather needs a tensor with at least one dimension (rows along dim 0)")


def all_gather_with_grad(x: Tensor, group: ProcessGroup | None = None) -> Tensor:
    """Concatenate ``x`` from all ranks along dim 0, carrying gradients back to their owners.

    The backward is a reduce-scatter (sum): every rank's loss that used row k of rank r contributes to rank
    r's gradient, so with DDP's gradient averaging the parameter gradient equals the single-process full-batch
    one.
    Every rank must pass the same shape (see the module docstring).
    """
    _check_rows(x)
    if dist_world_size(group) == 1:
        return x
    # Imported lazily: the functional-collectives module pulls in DTensor machinery not needed single-process.
    from torch.distributed._functional_collectives import all_gather_single_autograd, wait_tensor

    return wait_tensor(all_gather_single_autograd(x.contiguous(), 0, _group(group)))


@torch.no_grad()
def all_gather_no_grad(x: Tensor, group: ProcessGroup | None = None) -> Tensor:
    """Concatenate ``x`` from all ranks along dim 0 without autograd (group ids, masks, text ids; any dtype).

    Every rank must pass the same shape (see the module docstring).
    """
    _check_rows(x)
    if dist_world_size(group) == 1:
        return x.detach()
    from torch.distributed._functional_collectives import all_gather_single, wait_tensor

    return wait_tensor(all_gather_single(x.detach().contiguous(), 0, _group(group)))


def gather_row_counts(n_local: int, group: ProcessGroup | None = None) -> list[int]:
    """Row counts of every rank, in rank order (one tiny collective; no size check)."""
    if dist_world_size(group) == 1:
        return [int(n_local)]
    # The count travels on the device the collective backend expects (CUDA for NCCL, CPU for gloo).
    backend = dist.get_backend(_group(group))
    device = torch.device("cuda", torch.cuda.current_device()) if backend == "nccl" else torch.device("cpu")
    counts = all_gather_no_grad(torch.tensor([int(n_local)], dtype=torch.long, device=device), group)
    return [int(c) for c in counts.tolist()]


def rank_offset(n_local: int, group: ProcessGroup | None = None) -> int:
    """Global index of this rank's first row = sum of row counts on lower ranks.

    Also validates the equal-rows requirement: raises ``ValueError`` (on every rank, so none is left waiting
    in a later collective) when ranks hold different numbers of rows.
    """
    counts = gather_row_counts(n_local, group)
    if len(set(counts)) > 1:
        raise ValueError(
            f"all ranks must hold the same number of rows for the gathered contrastive loss, got per-rank "
            f"counts {counts}; drop the last partial batch or pad with masked rows"
        )
    return sum(counts[: _dist_rank(group)])
