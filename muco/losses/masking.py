"""Logit-mask builders and the gathered hard-negative columns.

Masks are boolean with True = "remove this column from the row's softmax".
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor
from torch.distributed import ProcessGroup

from muco.losses.gather import all_gather_no_grad, all_gather_with_grad, rank_offset

__all__ = ["HardNegatives", "gather_hard_negatives", "group_mask"]


def group_mask(row_group: Tensor, col_group: Tensor, pos: Tensor) -> Tensor:
    """Mask columns that share the row's group but are not its positive (docs/method.md §7 logit masking).

    Args:
        row_group: group id of each row [r] (any integer id: global image id in pretraining, sample id or
            text id in fine-tuning).
        col_group: group id of each column [C].
        pos: positive column of each row [r]; it is never masked.

    Returns:
        bool [r, C]: ``col_group[j] == row_group[i] and j != pos[i]``.
    """
    if row_group.shape != pos.shape:
        raise ValueError(f"row_group {tuple(row_group.shape)} and pos {tuple(pos.shape)} must match")
    same = row_group[:, None] == col_group[None, :]
    cols = torch.arange(col_group.shape[0], device=col_group.device)
    return same & (cols[None, :] != pos[:, None])


@dataclass
class HardNegatives:
    """Hard negatives gathered from all ranks: ``emb`` [M, d] (with grad) and their column mask ``mask``
    [r, M] (None when nothing is masked), for the ``r`` local loss rows they are appended to."""

    emb: Tensor
    mask: Tensor | None


def gather_hard_negatives(
    negatives: Tensor,
    n_rows: int,
    negative_valid: Tensor | None = None,
    row_text_id: Tensor | None = None,
    negative_text_id: Tensor | None = None,
    group: ProcessGroup | None = None,
) -> HardNegatives:
    """Gather local hard negatives ``[m, d]`` with gradient and build the mask of their columns.

    Args:
        negatives: local negatives [m, d]; every rank must pass the same m (validated).
        n_rows: number of local loss rows the columns are appended to.
        negative_valid: bool [m]; False marks a missing negative (masked, docs/method.md §8.4).
        row_text_id: int [n_rows], text id (hash) of each row's positive; with ``negative_text_id`` [m], a
            negative whose text equals the row's positive is masked (it would be a false negative). Ignored
            without ``negative_text_id``.
        negative_text_id: int [m], text id of each negative.
        group: process group (default world).
    """
    if negatives.dim() != 2:
        raise ValueError(f"negatives must be [m, d], got {tuple(negatives.shape)}")
    m = negatives.shape[0]
    rank_offset(m, group)  # only for its equal-size check: a mismatched gather aborts the process
    emb = all_gather_with_grad(negatives.float(), group)
    mask: Tensor | None = None
    if negative_valid is not None:
        if negative_valid.shape != (m,):
            raise ValueError(f"negative_valid must be [{m}], got {tuple(negative_valid.shape)}")
        valid_all = all_gather_no_grad(negative_valid.to(device=negatives.device, dtype=torch.bool), group)
        mask = (~valid_all)[None, :].expand(n_rows, -1)
    if negative_text_id is not None:
        if row_text_id is None:
            raise ValueError("negative_text_id needs the rows' positive text ids to compare against")
        if negative_text_id.shape != (m,) or row_text_id.shape != (n_rows,):
            raise ValueError("text ids must be [n_rows] for rows and [m] for negatives")
        neg_text_all = all_gather_no_grad(negative_text_id.to(negatives.device), group)
        same_text = row_text_id.to(negatives.device)[:, None] == neg_text_all[None, :]
        mask = same_text if mask is None else mask | same_text
    return HardNegatives(emb=emb, mask=mask)
