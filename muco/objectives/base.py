"""The objective contract: what one training/validation step computes from a batch, given the shared encoder.

The LightningModule (:class:`muco.train.module.MuCoModule`) owns the model, τ, the optimizer, checkpoints and
logging; an objective owns how a batch of its record kind is embedded (which sequences, how many ``<|emb|>``
turns) and which loss (with its hard negatives) those embeddings enter. One module class serves every stage:
pretraining is ``PretrainObjective``, fine-tuning ``FinetuneObjective``.

An objective answers in two halves so that a step can also run chunked (GradCache, :mod:`muco.train.grad_cache`):

- :meth:`Objective.sequences`: the named sets of sequences the batch embeds, in forward order;
- :meth:`Objective.compute_loss`: the loss from their pooled embeddings. It must treat every embedding row
  alike whatever produced it (no per-forward state), so embeddings computed chunk by chunk give the same loss.

:meth:`Objective.step` is the plain composition: every set embedded in one forward, then the loss.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from muco.components import Component, build_component
from muco.model.pooling import PooledEmbeddings

# embed(model inputs, <|emb|> turns per sequence, sample keys) -> pooled embeddings (the module's Embedder)
EmbedFn = Callable[[dict[str, torch.Tensor], Any, Sequence[str]], PooledEmbeddings]


@dataclass
class StepOutput:
    """A step's loss and its diagnostics (logged as ``<stage>/<name>``)."""

    loss: torch.Tensor
    metrics: dict[str, torch.Tensor] = field(default_factory=dict)


@dataclass
class StepCounts:
    """What a training batch holds, for throughput logging (mined negatives count as tokens only)."""

    images: int
    samples: int
    pairs: int
    tokens: int  # real tokens (attention mask), visual tokens included
    positions: int = 0  # token positions the model computes, padding included (rows x padded width)

    @property
    def token_efficiency(self) -> float | None:
        """The share of computed positions that are real tokens (1.0: no padding); None when unknown."""
        return self.tokens / self.positions if self.positions > 0 else None


def sequence_counts(sequences: list[dict[str, torch.Tensor]]) -> tuple[int, int]:
    """(real tokens, computed positions) of padded model inputs; one device sync for the token count."""
    if not sequences:
        return 0, 0
    tokens = torch.stack([s["attention_mask"].sum() for s in sequences]).sum()
    return int(tokens), sum(int(s["attention_mask"].numel()) for s in sequences)


@dataclass
class Sequences:
    """One set of sequences a batch embeds: padded model inputs (one row per sequence), the ``<|emb|>`` count
    of each row (an int for all rows, or a tensor [rows]) and each row's sample key (for error messages)."""

    inputs: dict[str, torch.Tensor]
    expected: int | torch.Tensor
    keys: list[str]


def embed_all(embed: EmbedFn, sequences: Mapping[str, Sequences]) -> dict[str, PooledEmbeddings]:
    """Every set embedded in one forward each, in the mapping's order."""
    return {name: embed(s.inputs, s.expected, s.keys) for name, s in sequences.items()}


class Objective(Component):
    """Base class of objectives; subclasses implement :meth:`sequences`, :meth:`compute_loss`, :meth:`counts`
    and :meth:`init_args`."""

    def sequences(self, batch: dict[str, Any]) -> dict[str, Sequences]:
        """The sets of sequences this batch embeds, by name, in forward order."""
        raise NotImplementedError

    def compute_loss(self, embeddings: Mapping[str, PooledEmbeddings], batch: dict[str, Any], tau: torch.Tensor,
                     rank: int) -> StepOutput:
        """The step's loss and metrics from the pooled embeddings of :meth:`sequences` (same names)."""
        raise NotImplementedError

    def step(self, embed: EmbedFn, batch: dict[str, Any], tau: torch.Tensor, rank: int) -> StepOutput:
        """One step: every sequence set embedded whole, then the loss."""
        return self.compute_loss(embed_all(embed, self.sequences(batch)), batch, tau, rank)

    def counts(self, batch: dict[str, Any]) -> StepCounts:
        raise NotImplementedError


def build_objective(value: Objective | Mapping[str, Any]) -> Objective:
    """An objective from an instance or its ``spec()`` (YAML / saved hyper-parameters)."""
    return build_component(value, Objective, "model.objective",
                           "muco.objectives.PretrainObjective or muco.objectives.FinetuneObjective")
