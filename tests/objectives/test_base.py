"""Step counts: real tokens against the positions a padded batch makes the model compute."""

from __future__ import annotations

import torch

from muco.objectives.base import StepCounts, sequence_counts


def padded(lengths: list[int]) -> dict[str, torch.Tensor]:
    width = max(lengths)
    mask = torch.tensor([[1] * n + [0] * (width - n) for n in lengths])
    return {"input_ids": torch.zeros_like(mask), "attention_mask": mask}


def test_sequence_counts_and_token_efficiency():
    tokens, positions = sequence_counts([padded([5, 3, 2]), padded([4, 4])])
    assert (tokens, positions) == (18, 15 + 8)
    assert StepCounts(images=0, samples=3, pairs=3, tokens=tokens, positions=positions).token_efficiency == 18 / 23
    assert StepCounts(0, 1, 1, *sequence_counts([padded([6, 6])])).token_efficiency == 1.0  # no padding
    assert StepCounts(0, 1, 1, tokens=7).token_efficiency is None  # positions unknown
