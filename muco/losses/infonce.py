"""The masked InfoNCE primitive shared by the pretraining and fine-tuning losses, and its output record."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["ContrastiveOutput", "masked_infonce", "similarity_stats"]


@dataclass
class ContrastiveOutput:
    """A contrastive loss and detached statistics for logging.

    Attributes:
        loss: the scalar to backpropagate (fp32).
        pos_sim: mean cosine of each loss row with its positive column.
        hardest_neg_sim: mean over loss rows of the largest cosine with an unmasked non-positive column (rows
            that have no such column are left out; NaN if none has one).
        masked_frac: fraction of all logits (positives included) that were masked to -inf.
        num_columns: columns per loss row (gathered targets, both forms where applicable, plus hard
            negatives).
        row_loss: per loss row cross-entropy, detached (for per-turn / per-term diagnostics).
        terms: named partial losses, detached (e.g. the four fine-tuning pairs, or both directions).
    """

    loss: Tensor
    pos_sim: Tensor
    hardest_neg_sim: Tensor
    masked_frac: Tensor
    num_columns: int
    row_loss: Tensor
    terms: dict[str, Tensor] = field(default_factory=dict)

    def log_dict(self, prefix: str = "") -> dict[str, Tensor | float]:
        """Flat ``{name: value}`` for ``LightningModule.log_dict``; tensors stay on device (no sync here)."""
        out: dict[str, Tensor | float] = {
            f"{prefix}loss": self.loss.detach(),
            f"{prefix}pos_sim": self.pos_sim,
            f"{prefix}hardest_neg_sim": self.hardest_neg_sim,
            f"{prefix}masked_frac": self.masked_frac,
            f"{prefix}num_columns": float(self.num_columns),
        }
        out.update({f"{prefix}term/{k}": v for k, v in self.terms.items()})
        return out


@torch.no_grad()
def similarity_stats(sim: Tensor, pos: Tensor, mask: Tensor | None) -> tuple[Tensor, Tensor, Tensor]:
    """(pos_sim, hardest_neg_sim, masked_frac) of cosines ``sim`` [r, C] with positives ``pos`` [r]."""
    sim = sim.detach().float()
    rows = torch.arange(sim.shape[0], device=sim.device)
    pos_sim = sim[rows, pos].mean()
    excluded = torch.zeros_like(sim, dtype=torch.bool) if mask is None else mask.clone()
    masked_frac = excluded.float().mean()
    excluded[rows, pos] = True
    hardest = sim.masked_fill(excluded, float("-inf")).amax(dim=1)
    has_neg = torch.isfinite(hardest)
    # Mean over rows with at least one negative, without a host sync; 0/0 gives NaN when none has one.
    hardest_neg_sim = torch.where(has_neg, hardest, torch.zeros_like(hardest)).sum() / has_neg.sum()
    return pos_sim, hardest_neg_sim, masked_frac


def masked_infonce(sim: Tensor, pos: Tensor, tau: float | Tensor, mask: Tensor | None = None) -> Tensor:
    """Per-row InfoNCE ``-log softmax(sim / tau)[pos]`` with masked columns removed from the softmax.

    Args:
        sim: cosine similarities [r, C]; cast to fp32 here because bf16 logits at τ = 0.02 lose the ranking.
        pos: positive column of each row [r] (int64); must never be masked.
        tau: temperature (float or 0-d tensor; a tensor keeps a learnable τ in the graph).
        mask: bool [r, C], True = column excluded. Masking happens on the logits with -inf, so a masked column
            contributes nothing to the value, and the gradient through it is exactly zero.

    Returns:
        per-row losses [r] (fp32, differentiable).
    """
    logits = sim.float() / tau
    if mask is not None:
        logits = logits.masked_fill(mask, float("-inf"))
    return F.cross_entropy(logits, pos, reduction="none")
