"""Where a stream is: counters shared with the DataLoader workers, each worker's position in its epoch, the
statistics a batch carries, and the point a resumed stream continues from.

A worker's stream within an epoch is a pure function of (seed, epoch, rank, worker), so its position (raw samples
read, batches delivered) is all a resumed worker needs to read past what was trained and continue with the very
next batch (:class:`ResumePoint`).
"""

from __future__ import annotations

import multiprocessing as mp
from dataclasses import dataclass, field, fields
from typing import TypeVar

P = TypeVar("P", bound="WorkerPosition")


class SharedCounts:
    """Per-worker counters in shared memory: the training process sees every worker's skips as they happen,
    also those after a worker's last batch, which no batch carries."""

    def __init__(self, n: int) -> None:
        self.values = mp.Array("q", max(1, n), lock=False)

    def add(self, i: int) -> None:
        self.values[i] += 1

    def reset(self) -> None:
        for i in range(len(self.values)):
            self.values[i] = 0

    def get(self, i: int) -> int:
        return int(self.values[i])


class SharedEpoch:
    """An epoch counter shared with (persistent) DataLoader workers, as in open_clip."""

    def __init__(self, epoch: int = 0) -> None:
        self.value = mp.Value("i", epoch, lock=False)  # no SemLock: picklable into spawn workers too

    def set_value(self, epoch: int) -> None:
        self.value.value = epoch

    def get_value(self) -> int:
        return int(self.value.value)


@dataclass
class WorkerPosition:
    """How far one (logical) worker got in the current epoch: raw samples read (decoded or skipped), bad
    samples skipped, samples and batches delivered, batch draws made. A batch carries it as of its last sample,
    so the DataModule knows the position of every batch training consumed."""

    raw: int = 0
    skipped: int = 0
    samples: int = 0
    batches: int = 0
    batch_no: int = 0

    @classmethod
    def restore(cls: type[P], saved: dict[str, int]) -> P:
        """The position a checkpoint saved; fields of another position class (length bucketing switched on or
        off since: no exact resume) are left out."""
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in saved.items() if k in names})


@dataclass
class WindowPosition(WorkerPosition):
    """A worker's position with length bucketing (:mod:`muco.data.length_buckets`): also where its current window
    of samples began. A window's batches leave in a shuffled order only once the whole window is read, so a
    resumed worker reads past ``window_raw`` raw samples without decoding them, decodes the window again and
    drops the ``window_batches`` batches it had already made. When a window's last batch is made the position
    moves to the next window, so a resume at a window boundary reads past everything, as without bucketing."""

    window: int = 0  # windows completed in this epoch (the index of the current one)
    window_raw: int = 0  # raw samples read before the current window
    window_skipped: int = 0  # bad samples skipped before it
    window_batches: int = 0  # batches of the current window already made (delivered, or failed to collate)

    @classmethod
    def restore(cls, saved: dict[str, int]) -> WindowPosition:
        """The position a checkpoint saved; one saved without bucketing resumes at a window boundary."""
        pos = super().restore(saved)
        if "window_raw" not in saved:
            pos.window_raw, pos.window_skipped = pos.raw, pos.skipped
        return pos


@dataclass
class BatchStats:
    """What a batch tells the training process about the worker that made it (``batch["stats"]``)."""

    worker: str  # e.g. "r0w1": rank 0, logical worker 1 ("val-r0w1" for validation)
    worker_index: int
    epoch: int
    train: bool
    skipped: int  # bad samples this worker skipped in this epoch so far
    samples: int  # samples this worker delivered in this epoch so far
    position: WorkerPosition = field(default_factory=WorkerPosition)
    skipped_total: int | None = None  # set by the DataModule as training takes the batch: all workers, all epochs


@dataclass
class ResumePoint:
    """Where one rank's stream resumes: an epoch, the batches the rank consumed in it and each logical worker's
    position (index = worker)."""

    epoch: int
    batches: int
    workers: list[dict[str, int]]
