"""Fine-tuning losses over the two embeddings per side (docs/method.md §8.3).

Each sample i gives a query q_i, its reconstruction-augmented form q'_i, a target p_i and its form p'_i
(+ an optional hard negative). Targets and negatives are gathered from all ranks with gradient; N = W·B
columns per form.

- :func:`blockwise_loss` (released code, project default): the **sum** of four InfoNCE terms (q,P), (q,P'),
  (q',P), (q',P'), each over one target family plus all hard negatives. A sample's other form is never in
  the same term, which is the implicit fine-tuning logit mask.
- :func:`joint_masked_loss` (paper): the **mean** over the 4N augmented pairs of a cross-entropy over all 2N
  target columns of both forms plus negatives, with the other form of the positive masked (§7 mask, group =
  sample id). The code's sum is 4× the paper's mean, so compare learning rates with that in mind.

Missing hard negatives are masked columns (``negative_valid``), docs/method.md §8.4.
"""

from __future__ import annotations

import torch
from torch import Tensor
from torch.distributed import ProcessGroup

from muco.losses.gather import all_gather_no_grad, all_gather_with_grad, rank_offset
from muco.losses.infonce import ContrastiveOutput, masked_infonce, similarity_stats
from muco.losses.masking import gather_hard_negatives, group_mask

__all__ = ["TERM_NAMES", "blockwise_loss", "joint_masked_loss"]

# Row blocks of the stacked [4B, C] problems, in this order: (query form, target form).
TERM_NAMES = ("q_p", "q_p2", "q2_p", "q2_p2")


class _Columns:
    """Everything both losses share: gathered columns [P; P'; Nn], cosines of q and q' with them, masks."""

    def __init__(
        self,
        q: Tensor,
        q2: Tensor,
        p: Tensor,
        p2: Tensor,
        negatives: Tensor | None,
        negative_valid: Tensor | None,
        positive_text_id: Tensor | None,
        negative_text_id: Tensor | None,
        mask_same_text: bool,
        group: ProcessGroup | None,
    ) -> None:
        if q.dim() != 2 or not (q.shape == q2.shape == p.shape == p2.shape):
            raise ValueError(
                f"q, q2, p, p2 must all be [B, d], got {[tuple(x.shape) for x in (q, q2, p, p2)]}"
            )
        b, dev = q.shape[0], q.device
        if positive_text_id is not None and positive_text_id.shape != (b,):
            raise ValueError(f"positive_text_id must be [{b}], got {tuple(positive_text_id.shape)}")
        if mask_same_text and positive_text_id is None:
            raise ValueError("mask_same_text needs positive_text_id")
        offset = rank_offset(b, group)
        self.b = b
        self.pos = offset + torch.arange(b, device=dev)  # column of p_i within its form's block
        pp = all_gather_with_grad(torch.cat([p.float(), p2.float()], dim=1), group)  # one collective for both
        d = q.shape[1]
        P, P2 = pp[:, :d], pp[:, d:]
        self.n = P.shape[0]
        # Same-text mask within one target form (columns of other samples whose target text equals this
        # row's): identical positives such as shared class names are otherwise false negatives (§8.3).
        self.text_mask: Tensor | None = None
        self.text_local = self.text_all = None
        if mask_same_text:
            self.text_local = positive_text_id.to(dev)
            self.text_all = all_gather_no_grad(self.text_local, group)
            self.text_mask = group_mask(self.text_local, self.text_all, self.pos)
        cols = [P, P2]
        self.neg_mask: Tensor | None = None
        self.m = 0
        if negatives is not None:
            if negatives.dim() != 2 or negatives.shape[1] != d:
                raise ValueError(f"negatives must be [m, {d}], got {tuple(negatives.shape)}")
            hn = gather_hard_negatives(
                negatives, b, negative_valid, positive_text_id, negative_text_id, group
            )
            cols.append(hn.emb)
            self.m = hn.emb.shape[0]
            self.neg_mask = hn.mask
        elif negative_valid is not None or negative_text_id is not None:
            raise ValueError("negative_valid / negative_text_id given without negatives")
        all_cols = torch.cat(cols, dim=0)  # [2N + M, d]
        self.sim_q = q.float() @ all_cols.T  # [B, 2N + M]; q and q' see the same columns
        self.sim_q2 = q2.float() @ all_cols.T

    def neg_block(self) -> Tensor:
        """Mask of the hard-negative columns for B rows [B, M] (all False when nothing is masked)."""
        if self.neg_mask is not None:
            return self.neg_mask
        return torch.zeros((self.b, self.m), dtype=torch.bool, device=self.sim_q.device)


def _output(
    sim: Tensor, pos: Tensor, mask: Tensor, row_loss: Tensor, loss: Tensor, b: int
) -> ContrastiveOutput:
    per_term = row_loss.detach().view(len(TERM_NAMES), b).mean(dim=1)
    pos_sim, hardest, masked_frac = similarity_stats(sim, pos, mask)
    return ContrastiveOutput(
        loss=loss,
        pos_sim=pos_sim,
        hardest_neg_sim=hardest,
        masked_frac=masked_frac,
        num_columns=sim.shape[1],
        row_loss=row_loss.detach(),
        terms=dict(zip(TERM_NAMES, per_term.unbind(0))),
    )


def blockwise_loss(
    q: Tensor,
    q2: Tensor,
    p: Tensor,
    p2: Tensor,
    tau: float | Tensor = 0.02,
    negatives: Tensor | None = None,
    negative_valid: Tensor | None = None,
    positive_text_id: Tensor | None = None,
    negative_text_id: Tensor | None = None,
    mask_same_text: bool = False,
    group: ProcessGroup | None = None,
) -> ContrastiveOutput:
    """Released-code fine-tuning loss: sum over (a, T) in (q,P), (q,P'), (q',P), (q',P') of
    ``CE(cat([a @ T.T, a @ Nn.T]) / τ, rank_offset + arange(B))`` (each term a mean over local rows).

    Args:
        q, q2: local query embeddings and their augmented forms [B, d], L2-normalised.
        p, p2: local target embeddings and their augmented forms [B, d], L2-normalised.
        tau: temperature (float or 0-d tensor).
        negatives: optional local hard negatives [M_local, d] (one per sample in MuCo), appended to every
            term.
        negative_valid: optional bool [M_local]; False = missing negative, its column is masked.
        positive_text_id: optional int [B], hash of each sample's target text; masks hard negatives with an
            equal ``negative_text_id``, and with ``mask_same_text`` other samples' targets with the same text.
        negative_text_id: optional int [M_local].
        mask_same_text: off by default (docs/method.md §8.3).
        group: process group (default world).

    Returns:
        :class:`ContrastiveOutput` with ``terms`` keyed by :data:`TERM_NAMES` and ``row_loss`` [4B] in that
        block order.
    """
    c = _Columns(
        q, q2, p, p2, negatives, negative_valid, positive_text_id, negative_text_id, mask_same_text, group
    )
    n = c.n
    neg = slice(2 * n, None)
    # Each term keeps one target family: drop the other family's N columns entirely (not just mask them), so
    # the column count and stats match the released code.
    sim = torch.cat(
        [
            torch.cat([c.sim_q[:, :n], c.sim_q[:, neg]], dim=1),
            torch.cat([c.sim_q[:, n : 2 * n], c.sim_q[:, neg]], dim=1),
            torch.cat([c.sim_q2[:, :n], c.sim_q2[:, neg]], dim=1),
            torch.cat([c.sim_q2[:, n : 2 * n], c.sim_q2[:, neg]], dim=1),
        ],
        dim=0,
    )  # [4B, N + M]
    pos = c.pos.repeat(4)
    batch_mask = c.text_mask
    if batch_mask is None:
        batch_mask = torch.zeros_like(c.sim_q[:, :n], dtype=torch.bool)
    mask = torch.cat([batch_mask, c.neg_block()], dim=1).repeat(4, 1)
    row_loss = masked_infonce(sim, pos, tau, mask)
    loss = row_loss.view(4, c.b).mean(dim=1).sum()
    return _output(sim, pos, mask, row_loss, loss, c.b)


def joint_masked_loss(
    q: Tensor,
    q2: Tensor,
    p: Tensor,
    p2: Tensor,
    tau: float | Tensor = 0.02,
    negatives: Tensor | None = None,
    negative_valid: Tensor | None = None,
    positive_text_id: Tensor | None = None,
    negative_text_id: Tensor | None = None,
    mask_same_text: bool = False,
    mask_other_form: bool = True,
    group: ProcessGroup | None = None,
) -> ContrastiveOutput:
    """Paper fine-tuning loss: mean over the 4B local augmented pairs (q,p), (q,p'), (q',p), (q',p') of a CE
    over all 2N gathered target columns [P; P'] plus hard negatives, with the positive's other form masked.

    Arguments as :func:`blockwise_loss`, plus ``mask_other_form`` (default True; False only for the ablation
    in which MMEB collapses to ~31 — the mask is mandatory for training).
    """
    c = _Columns(
        q, q2, p, p2, negatives, negative_valid, positive_text_id, negative_text_id, mask_same_text, group
    )
    n, b = c.n, c.b
    sim = torch.cat([c.sim_q, c.sim_q, c.sim_q2, c.sim_q2], dim=0)  # [4B, 2N + M]
    pos = torch.cat([c.pos, c.pos + n, c.pos, c.pos + n])
    # §7 mask builder with group id = sample id over both forms: masks exactly the other form of the positive.
    sample_all = torch.arange(n, device=q.device)
    col_group = torch.cat([sample_all, sample_all])
    row_group = c.pos.repeat(4)
    batch_mask = torch.zeros((4 * b, 2 * n), dtype=torch.bool, device=q.device)
    if mask_other_form:
        batch_mask = group_mask(row_group, col_group, pos)
    if c.text_mask is not None:
        text_cols = torch.cat([c.text_all, c.text_all])
        batch_mask = batch_mask | group_mask(c.text_local.repeat(4), text_cols, pos)
    mask = torch.cat([batch_mask, c.neg_block().repeat(4, 1)], dim=1)
    row_loss = masked_infonce(sim, pos, tau, mask)
    loss = row_loss.mean()
    return _output(sim, pos, mask, row_loss, loss, b)
