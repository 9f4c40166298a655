"""Objectives: what a step computes from a batch with the shared encoder (:mod:`muco.objectives.base`)."""

from muco.objectives.base import Objective, Sequences, StepCounts, StepOutput, build_objective, embed_all
from muco.objectives.finetune import FinetuneObjective
from muco.objectives.pretrain import PretrainObjective

__all__ = ["FinetuneObjective", "Objective", "PretrainObjective", "Sequences", "StepCounts", "StepOutput",
           "build_objective", "embed_all"]
