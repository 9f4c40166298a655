"""The objective contract: what one training/validation step computes from a batch, given the shared encoder.

The LightningModule (:class:`muco.train.module.MuCoModule`) owns the model, τ, the optimizer, checkpoints and
logging; an objective owns how a batch of its record kind is embedded (which sequences, how many ``<|emb|>``
turns) and which loss (with its hard negatives) those embeddings enter. One module class serves every stage:
pretraining is ``PretrainObjective``, fine-tuning ``FinetuneObjective``.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

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
    tokens: int


class Objective:
    """Base class of objectives; subclasses implement :meth:`step`, :meth:`counts` and :meth:`init_args`."""

    def step(self, embed: EmbedFn, batch: dict[str, Any], tau: torch.Tensor, rank: int) -> StepOutput:
        raise NotImplementedError

    def counts(self, batch: dict[str, Any]) -> StepCounts:
        raise NotImplementedError

    def init_args(self) -> dict[str, Any]:
        """The constructor arguments, plain values only (saved in checkpoints' hyper-parameters)."""
        raise NotImplementedError

    def spec(self) -> dict[str, Any]:
        """``{"class_path", "init_args"}``: the YAML form, which :func:`build_objective` reads back."""
        cls = type(self)
        return {"class_path": f"{cls.__module__}.{cls.__qualname__}", "init_args": self.init_args()}


def build_objective(value: Objective | Mapping[str, Any]) -> Objective:
    """An objective from an instance or its ``spec()`` (YAML / saved hyper-parameters). Only subclasses of
    :class:`Objective` are built; nothing else is imported or evaluated."""
    if isinstance(value, Objective):
        return value
    if not isinstance(value, Mapping) or "class_path" not in value:
        raise TypeError(f"model.objective must be an objective ({{class_path, init_args}}), got {value!r}")
    module, _, name = str(value["class_path"]).rpartition(".")
    try:
        cls = getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError, ValueError) as e:
        raise ValueError(f"model.objective.class_path={value['class_path']!r} is not importable ({e}); use "
                         "muco.objectives.PretrainObjective or muco.objectives.FinetuneObjective") from None
    if not (isinstance(cls, type) and issubclass(cls, Objective)):
        raise ValueError(f"model.objective.class_path={value['class_path']!r} is not an Objective")
    return cls(**dict(value.get("init_args") or {}))
