"""The progress bar of ``muco fit``: says how far the run is in the unit that bounds it.

Lightning's default bar reads ``Epoch 0/-2`` when a run is bounded by ``max_steps`` (its ``max_epochs`` is -1
then); muco runs are bounded by optimizer steps, so the bar names the step out of ``max_steps``, and the epoch
out of ``max_epochs`` only when there is such a bound.
"""

from __future__ import annotations

from typing import Any

from lightning.pytorch import LightningModule, Trainer
from lightning.pytorch.callbacks import TQDMProgressBar


def train_description(epoch: int, max_epochs: int | None, step: int, max_steps: int) -> str:
    """``epoch 2/9`` or ``epoch 0`` (no epoch bound: ``max_epochs`` None or negative), followed by
    ``, step 120/4984`` when ``max_steps`` bounds the run (``max_steps`` >= 0)."""
    text = f"epoch {epoch}" if max_epochs is None or max_epochs < 0 else f"epoch {epoch}/{max_epochs - 1}"
    return text if max_steps < 0 else f"{text}, step {step}/{max_steps}"


class StepProgressBar(TQDMProgressBar):
    """``TQDMProgressBar`` whose training description is :func:`train_description` (the bar itself counts the
    batches of the current epoch, as Lightning's does); ``muco fit`` adds it unless the config brings its own
    progress bar or sets ``trainer.enable_progress_bar: false``."""

    def _describe(self, trainer: Trainer, refresh: bool) -> None:
        bar = self._train_progress_bar
        if bar is not None:
            bar.set_description(train_description(trainer.current_epoch, trainer.max_epochs, trainer.global_step,
                                                  trainer.max_steps), refresh=refresh)

    def on_train_epoch_start(self, trainer: Trainer, *args: Any) -> None:
        super().on_train_epoch_start(trainer, *args)
        self._describe(trainer, refresh=True)

    def on_train_batch_end(self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        if trainer.max_steps >= 0:
            self._describe(trainer, refresh=False)  # the update below redraws it
        super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)
