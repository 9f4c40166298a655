"""MuCo: multi-turn contrastive training of Qwen2-VL multimodal embedders.

The names most users need, importable from the top level (``from muco import MuCoEncoder, load_encoder``).
They load on first use, so ``import muco`` (and every ``muco`` command's start) stays cheap.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

# public name -> the module that defines it (docs/architecture.md has the tree)
EXPORTS: dict[str, str] = {
    # inference
    "MuCoEncoder": "muco.encoder",
    "load_encoder": "muco.train.checkpoint",
    # training
    "MuCoModule": "muco.train.module",
    "MuCoDataModule": "muco.data.datamodule",
    "M3TRecords": "muco.data.m3t.kind",
    "PairRecords": "muco.data.pairs.kind",
    "PretrainObjective": "muco.objectives.pretrain",
    "FinetuneObjective": "muco.objectives.finetune",
    # losses
    "pretrain_loss": "muco.losses.pretrain",
    "blockwise_loss": "muco.losses.finetune",
    "joint_masked_loss": "muco.losses.finetune",
    # templates
    "base_template": "muco.inputs.templates",
    "pretrain_template": "muco.inputs.templates",
    "finetune_template": "muco.inputs.templates",
    # evaluation
    "evaluate_tasks": "muco.eval.harness",
    "load_task_list": "muco.eval.tasks",
}
__all__ = ["__version__", *EXPORTS]


def __getattr__(name: str) -> Any:
    module = EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'muco' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value  # later lookups skip this function
    return value


def __dir__() -> list[str]:
    return sorted(__all__)
