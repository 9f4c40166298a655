"""Contrastive losses and the gradient-carrying gather (pure torch; docs/method.md §7-§8)."""

from muco.losses.finetune import TERM_NAMES, blockwise_loss, joint_masked_loss
from muco.losses.gather import (
    all_gather_no_grad,
    all_gather_with_grad,
    dist_world_size,
    gather_row_counts,
    rank_offset,
)
from muco.losses.infonce import ContrastiveOutput, masked_infonce, similarity_stats
from muco.losses.masking import HardNegatives, gather_hard_negatives, group_mask
from muco.losses.pretrain import pretrain_loss
from muco.losses.temperature import Temperature, TemperatureSchedule

__all__ = [
    "TERM_NAMES",
    "ContrastiveOutput",
    "HardNegatives",
    "Temperature",
    "TemperatureSchedule",
    "all_gather_no_grad",
    "all_gather_with_grad",
    "blockwise_loss",
    "dist_world_size",
    "gather_hard_negatives",
    "gather_row_counts",
    "group_mask",
    "joint_masked_loss",
    "masked_infonce",
    "pretrain_loss",
    "rank_offset",
    "similarity_stats",
]
