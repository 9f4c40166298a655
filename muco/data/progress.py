"""The training data position of one rank, as training consumes batches: the epoch, the batches taken in it, each
dataloader worker's position as of its last batch taken, samples seen and bad samples skipped. It is what the
DataModule checkpoints and restores for an exact resume (the loader itself runs ahead of training by its
prefetch, so positions are recorded when training takes a batch, not when a worker makes it)."""

from __future__ import annotations

import logging
from dataclasses import asdict
from typing import Any

from muco.data.position import BatchStats, ResumePoint, SharedCounts

log = logging.getLogger("muco.data")


class DataProgress:
    def __init__(self, num_workers: int) -> None:
        self.num_workers = num_workers
        self.epoch = -1  # last epoch handed to an iterator
        self.next_epoch = 0  # the next iterator's epoch (set on resume)
        self.samples_seen = 0  # this rank's samples delivered to training
        self.epoch_batches = 0  # training batches consumed in the current epoch
        self.positions: dict[int, dict[str, int]] = {}  # logical worker -> position of its last consumed batch
        self.skipped_before = 0  # bad samples skipped in earlier epochs
        self.skip_counts: SharedCounts | None = None  # every worker's skips of this epoch, as they happen
        self.resume: ResumePoint | None = None  # from a checkpoint, for the next training iterator
        self._untaken: tuple[int, ResumePoint | None] | None = None  # the last iterator's, until a batch is taken

    def begin_epoch(self, batches_per_epoch: int | None = None) -> tuple[int, ResumePoint | None]:
        """A new training iterator starts: its epoch and, when it continues a checkpointed epoch, where.

        Epochs are counted here, not taken from the trainer, and only iterators training takes a batch from
        count: Lightning makes a spare one when it reloads a loader, and resumed from a checkpoint written at an
        epoch's last batch it ends a phantom epoch without a batch and numbers the next one higher than the
        uninterrupted run; the data must still continue with the very next batch. ``batches_per_epoch`` tells
        whether a checkpointed position closed its epoch."""
        if self._untaken is not None:  # the previous iterator gave training nothing: this one replaces it
            if self.skip_counts is not None:
                self.skip_counts.reset()  # its workers' skips (read ahead) are counted again by this one's
            return self._untaken
        epoch, point = self.next_epoch, self.resume
        self.resume = None
        if point is not None and batches_per_epoch is not None and point.batches >= batches_per_epoch:
            # written at its epoch's last batch: that epoch is over (its skips are counted below)
            self.positions = {w: p for w, p in enumerate(point.workers) if p is not None}
            epoch, point = epoch + 1, None
        self.epoch, self.next_epoch = epoch, epoch + 1
        if point is None:
            self.skipped_before += self.skipped_this_epoch()  # the epoch that just ended
        if self.skip_counts is not None:
            self.skip_counts.reset()
        self.epoch_batches = 0 if point is None else point.batches
        self.positions = {} if point is None else {w: p for w, p in enumerate(point.workers) if p is not None}
        self._untaken = (epoch, point)
        return epoch, point

    def took(self, stats: BatchStats, samples: int) -> None:
        """Training took a batch of ``samples`` samples made by the worker ``stats`` describes."""
        self._untaken = None
        self.positions[int(stats.worker_index)] = asdict(stats.position)
        self.epoch_batches += 1
        self.samples_seen += samples

    def skipped_this_epoch(self) -> int:
        """Skips of the current epoch: those before the batches training took, or, where a worker got further
        (prefetching, or bad samples after its last batch), what it counted in shared memory."""
        workers = set(self.positions) | set(range(max(1, self.num_workers)))
        shared = self.skip_counts
        return sum(max(self.positions.get(w, {}).get("skipped", 0), shared.get(w) if shared else 0) for w in workers)

    def skipped_total(self) -> int:
        """Bad training samples skipped so far in this run (all epochs, all of this rank's workers)."""
        return self.skipped_before + self.skipped_this_epoch()

    def state(self) -> dict[str, Any]:
        """This rank's part of the DataModule's state."""
        return {"epoch": self.epoch, "batches": self.epoch_batches, "samples_seen": self.samples_seen,
                "skipped_before": self.skipped_before,
                "workers": [self.positions.get(w) for w in range(max(1, self.num_workers))]}

    def restore(self, mine: dict[str, Any]) -> None:
        """Continue from this rank's saved part: the next iterator re-enters the saved epoch at its position."""
        self.epoch, self.next_epoch = int(mine["epoch"]) - 1, int(mine["epoch"])
        self.resume = ResumePoint(epoch=int(mine["epoch"]), batches=int(mine["batches"]), workers=mine["workers"])
        self._untaken = None
        self.samples_seen = int(mine["samples_seen"])
        self.skipped_before = int(mine.get("skipped_before", 0))

    def restart_after(self, epoch: int, samples_seen: int) -> None:
        """No exact position (an older format, or a re-split): continue with the next epoch's seeds."""
        self.epoch, self.next_epoch = epoch, epoch + 1
        self.samples_seen = samples_seen
        self._untaken = None
