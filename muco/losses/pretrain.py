"""Pretraining loss: multi-turn InfoNCE with logit masking (docs/method.md §7).

Row i (a local ``<|emb|>`` slot of a query) has group id g(i) (global id of its image) and positive column
c(i) = rank_offset + i among the gathered targets. With s_ij the cosine of query i and global target j:

    l_i = -log( exp(s_{i,c(i)}/τ) / Σ_{j ∈ A(i)} exp(s_ij/τ) ),  A(i) = {j : g(j) ≠ g(i)} ∪ {c(i)} ∪ negs
    L   = mean of l_i over the local rows (DDP then averages over ranks → the full-batch mean)

Group ids replace the released code's hard-coded 7 turns, so any number of turns per image works.
"""

from __future__ import annotations

import torch
from torch import Tensor
from torch.distributed import ProcessGroup

from muco.losses.gather import all_gather_no_grad, all_gather_with_grad, rank_offset
from muco.losses.infonce import ContrastiveOutput, masked_infonce, similarity_stats
from muco.losses.masking import gather_hard_negatives, group_mask

__all__ = ["ContrastiveOutput", "group_mask", "pretrain_loss"]


def _check_rows(name: str, x: Tensor | None, n: int, dim: int) -> None:
    if x is not None and (x.dim() != dim or x.shape[0] != n):
        raise ValueError(f"{name} must have {n} rows and {dim} dims, got {tuple(x.shape)}")


def pretrain_loss(
    q: Tensor,
    t: Tensor,
    group_id: Tensor,
    tau: float | Tensor = 0.02,
    negatives: Tensor | None = None,
    negative_valid: Tensor | None = None,
    positive_text_id: Tensor | None = None,
    negative_text_id: Tensor | None = None,
    symmetric: bool = False,
    mask_same_text: bool = False,
    group: ProcessGroup | None = None,
) -> ContrastiveOutput:
    """Multi-turn InfoNCE: local query rows against the targets gathered (with gradient) from all ranks.

    Args:
        q: local query embeddings [n, d], L2-normalised (cast to fp32 here); row k pairs with ``t`` row k.
        t: local target embeddings [n, d], L2-normalised.
        group_id: int [n], *global* group (image) id of each row; rows of one image share it, and its other
            targets are masked out of the row's softmax. All-distinct ids give plain InfoNCE.
        tau: temperature (float or 0-d tensor from :class:`~muco.losses.temperature.Temperature`).
        negatives: optional local hard negatives [m, d], gathered with gradient and appended as columns for
            every query row (not used in MuCo pretraining; available for experiments).
        negative_valid: optional bool [m]; False masks that negative's column (a missing negative).
        positive_text_id: optional int [n], hash of each row's positive text. Masks hard negatives with an
            equal ``negative_text_id`` [m]; with ``mask_same_text`` also masks in-batch targets with the same
            text as the row's positive (identical answers of different images would otherwise be false
            negatives).
        negative_text_id: optional int [m], hash of each negative's text.
        symmetric: add the target→query direction (same mask, no hard negatives) and average the two; off in
            MuCo (only query→target is used).
        mask_same_text: see ``positive_text_id``; off by default.
        group: process group to gather over (default world).

    Returns:
        :class:`ContrastiveOutput`; stats describe the query→target direction. Every rank must pass the same
        ``n`` (and ``m``); a mismatch raises ``ValueError`` on every rank.
    """
    if q.dim() != 2 or q.shape != t.shape:
        raise ValueError(f"q and t must both be [n, d], got {tuple(q.shape)} and {tuple(t.shape)}")
    n = q.shape[0]
    _check_rows("group_id", group_id, n, 1)
    _check_rows("positive_text_id", positive_text_id, n, 1)
    if mask_same_text and positive_text_id is None:
        raise ValueError("mask_same_text needs positive_text_id")

    offset = rank_offset(n, group)  # also the equal-rows check, before any gather of data
    # fp32 before the gather: remote gradients are then summed in fp32 as well.
    q32, t32 = q.float(), t.float()
    t_all = all_gather_with_grad(t32, group)  # [N, d]
    gid_all = all_gather_no_grad(group_id.to(q.device), group)  # [N]
    pos = offset + torch.arange(n, device=q.device)

    batch_mask = group_mask(group_id.to(q.device), gid_all, pos)
    if mask_same_text:
        text_all = all_gather_no_grad(positive_text_id.to(q.device), group)
        batch_mask = batch_mask | group_mask(positive_text_id.to(q.device), text_all, pos)

    sim = q32 @ t_all.T  # [n, N]
    mask = batch_mask
    if negatives is not None:
        if negatives.dim() != 2 or negatives.shape[1] != q.shape[1]:
            raise ValueError(f"negatives must be [m, {q.shape[1]}], got {tuple(negatives.shape)}")
        hn = gather_hard_negatives(
            negatives, n, negative_valid, positive_text_id, negative_text_id, group=group
        )
        sim = torch.cat([sim, q32 @ hn.emb.T], dim=1)
        neg_mask = hn.mask if hn.mask is not None else sim.new_zeros((n, hn.emb.shape[0]), dtype=torch.bool)
        mask = torch.cat([batch_mask, neg_mask], dim=1)
    elif negative_valid is not None or negative_text_id is not None:
        raise ValueError("negative_valid / negative_text_id given without negatives")

    row_loss = masked_infonce(sim, pos, tau, mask)
    loss = row_loss.mean()
    terms: dict[str, Tensor] = {}
    if symmetric:
        q_all = all_gather_with_grad(q32, group)
        # The group relation is symmetric, so the query→target in-batch mask serves the reverse direction.
        row_loss_t = masked_infonce(t32 @ q_all.T, pos, tau, batch_mask)
        terms = {"q2t": loss.detach(), "t2q": row_loss_t.mean().detach()}
        loss = 0.5 * (loss + row_loss_t.mean())

    pos_sim, hardest, masked_frac = similarity_stats(sim, pos, mask)
    return ContrastiveOutput(
        loss=loss,
        pos_sim=pos_sim,
        hardest_neg_sim=hardest,
        masked_frac=masked_frac,
        num_columns=sim.shape[1],
        row_loss=row_loss.detach(),
        terms=terms,
    )
