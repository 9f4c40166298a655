"""The training progress bar says something true: the step out of max_steps, never Lightning's "Epoch 0/-2"."""

from __future__ import annotations

import pytest
from lightning.pytorch import Trainer
from lightning.pytorch.demos.boring_classes import BoringModel

from muco.train.progress import StepProgressBar, train_description


@pytest.mark.parametrize(("args", "want"), [
    ((0, -1, 120, 4984), "epoch 0, step 120/4984"),  # max_steps bounds the run: Lightning sets max_epochs -1
    ((0, None, 3, 30), "epoch 0, step 3/30"),
    ((1, 2, 40, -1), "epoch 1/1"),  # bounded by epochs only (finetune_2b: max_epochs 1, max_steps -1)
    ((1, 3, 40, 50), "epoch 1/2, step 40/50"),
    ((4, -1, 7, -1), "epoch 4"),
])
def test_description(args, want):
    assert train_description(*args) == want


def fit_boring(tmp_path, bar, **trainer_kwargs):
    trainer = Trainer(default_root_dir=tmp_path, accelerator="cpu", devices=1, logger=False,
                      enable_checkpointing=False, enable_model_summary=False, callbacks=[bar],
                      limit_val_batches=0, **trainer_kwargs)
    trainer.fit(BoringModel())
    return trainer


def test_the_bar_of_a_run_bounded_by_max_steps_counts_steps(tmp_path):
    bar = StepProgressBar()
    trainer = fit_boring(tmp_path, bar, max_steps=5)
    assert trainer.max_epochs == -1  # what made Lightning's bar read "Epoch 0/-2"
    assert bar._train_progress_bar.desc.removesuffix(": ") == "epoch 0, step 5/5"  # tqdm adds ": "


def test_the_bar_of_a_run_bounded_by_epochs_names_the_last_epoch(tmp_path):
    bar = StepProgressBar()
    fit_boring(tmp_path, bar, max_epochs=2, limit_train_batches=3)
    assert bar._train_progress_bar.desc.removesuffix(": ") == "epoch 1/1"
