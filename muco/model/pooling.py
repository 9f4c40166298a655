"""Embedding pooling: the last hidden state at every ``<|emb|>`` token (docs/method.md §6)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn


class EmbeddingCountError(ValueError):
    """A sequence holds a different number of ``<|emb|>`` tokens than the template put there."""


@dataclass
class PooledEmbeddings:
    """``emb`` (n, d) fp32 L2-normalised, sample-major and in turn order; ``sample_id``/``turn_id`` (n,)."""

    emb: torch.Tensor
    sample_id: torch.Tensor
    turn_id: torch.Tensor


class EmbeddingPooler(nn.Module):
    """Gathers hidden states at ``<|emb|>`` positions and checks their count per sequence."""

    def __init__(self, emb_token_id: int) -> None:
        super().__init__()
        self.emb_token_id = int(emb_token_id)

    def forward(
        self,
        hidden: torch.Tensor,
        input_ids: torch.Tensor,
        expected: int | torch.Tensor,
        keys: Sequence[str] | None = None,
        flat_index: torch.Tensor | None = None,
    ) -> PooledEmbeddings:
        """``hidden`` (B, L, d) for ``input_ids`` (B, L); or, with ``flat_index`` (B, L) (a packed forward's,
        ``muco.model.packing``), one packed row (1, N, d) of the batch's real tokens."""
        is_emb = input_ids == self.emb_token_id
        counts = is_emb.sum(dim=1)
        want = torch.as_tensor(expected, device=counts.device).expand_as(counts)
        if not torch.equal(counts, want):
            i = int((counts != want).nonzero()[0])
            who = repr(keys[i]) if keys is not None else f"#{i}"
            raise EmbeddingCountError(
                f"sequence {who} holds {int(counts[i])} <|emb|> tokens but its template put {int(want[i])} "
                "there (a literal <|emb|> in the data, or a truncated sequence)"
            )
        # nonzero() walks row-major: sample-major, then position order = turn order within a sample.
        sample_id, pos = is_emb.nonzero(as_tuple=True)
        starts = torch.cumsum(counts, 0) - counts
        turn_id = torch.arange(sample_id.numel(), device=sample_id.device) - starts[sample_id]
        at = hidden[sample_id, pos] if flat_index is None else hidden[0, flat_index[sample_id, pos]]
        emb = F.normalize(at.float(), dim=-1)
        return PooledEmbeddings(emb=emb, sample_id=sample_id, turn_id=turn_id)
