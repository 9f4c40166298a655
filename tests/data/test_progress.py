"""DataProgress: the data epoch of each training iterator. Only iterators training takes a batch from count
(Lightning makes spare ones), and a checkpointed position at its epoch's last batch closes that epoch."""

from __future__ import annotations

from muco.data.position import BatchStats, WorkerPosition
from muco.data.progress import DataProgress


def take(progress: DataProgress, epoch: int, batches: int, skipped: int = 0) -> None:
    for b in range(batches):
        pos = WorkerPosition(raw=4 * (b + 1) + skipped, skipped=skipped, samples=4 * (b + 1), batches=b + 1)
        progress.took(BatchStats("r0w0", 0, epoch, True, skipped, 4 * (b + 1), pos), 4)


def test_epochs_count_iterators_that_training_took_from():
    p = DataProgress(num_workers=1)
    assert p.begin_epoch(4) == (0, None)
    take(p, 0, 4)
    assert p.begin_epoch(4) == (1, None)
    assert p.begin_epoch(4) == (1, None)  # a spare iterator (a reloaded loader is probed): same epoch again
    take(p, 1, 2)
    assert p.begin_epoch(4) == (2, None)


def test_a_checkpoint_inside_an_epoch_resumes_there_even_after_a_spare_iterator():
    p = DataProgress(num_workers=1)
    p.begin_epoch(4)
    take(p, 0, 2)
    saved = p.state()
    q = DataProgress(num_workers=1)
    q.restore(saved)
    epoch, point = q.begin_epoch(4)
    assert (epoch, point.batches) == (0, 2)
    assert q.begin_epoch(4) == (epoch, point)  # dropped before a batch: the next one resumes at the same place


def test_a_checkpoint_at_the_last_batch_of_its_epoch_continues_with_the_next_epoch():
    p = DataProgress(num_workers=1)
    p.begin_epoch(4)
    take(p, 0, 4, skipped=3)
    q = DataProgress(num_workers=1)
    q.restore(p.state())
    assert q.begin_epoch(4) == (1, None)  # not a re-entry that yields nothing, and not epoch 2
    assert q.begin_epoch(4) == (1, None)  # Lightning's phantom epoch end drops that iterator: still epoch 1
    assert q.skipped_total() == 3  # the closed epoch's skips are kept
    r = DataProgress(num_workers=1)
    r.restore(p.state())
    assert r.begin_epoch(None)[0] == 0  # without a known epoch length the position is re-entered
