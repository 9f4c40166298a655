"""The streaming dataset of one rank, composed of stages: shard URLs -> raw samples (tar reader) -> shuffle ->
decoded samples (the record kind's decoder) -> batches (optionally re-arranged) -> collated batches (the record
kind's collator). It knows nothing about what a record holds; ``muco.data.m3t`` and ``muco.data.pairs`` do.

Everything expensive (tar reading, JPEG decode, resize, tokenisation, patchifying, collation) runs in
DataLoader workers; the loader is built with ``batch_size=None``. Rank and world size are given explicitly
at construction (computed in the training process), so shard splitting is right whatever the worker start
method (``split_by_node`` silently does not split in spawn/forkserver workers). Every random
choice comes from a stable hash of (seed, epoch, rank, worker, ...) like open_clip, so epochs are reproducible.

Exact resume: a worker's stream within an epoch is a pure function of (seed, epoch, rank, worker), so a
:class:`~muco.data.position.ResumePoint` (each worker's raw samples read and batches delivered) lets a restarted
worker read past the samples already trained, without decoding their images, and continue with the very next
batch. With length bucketing (``length_bucketing``, :mod:`muco.data.length_buckets`) batches are cut from
windows of decoded samples; a resumed worker reads past the windows it finished and decodes its current window
again (:class:`~muco.data.position.WindowPosition`).

Bad samples (corrupt image, missing member, bad JSON, wrong turn count, empty query, truncated tar) are
skipped, counted per worker and reported with a rate-limited warning naming the shard and key; every batch
carries ``batch["stats"]`` (a :class:`~muco.data.position.BatchStats`: worker, epoch, skips and samples of this
worker in this epoch, and its position) so the training process can log them and checkpoint the exact data
position.
"""

from __future__ import annotations

import logging
import random
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, replace
from itertools import islice
from typing import Any

from torch.utils.data import IterableDataset, get_worker_info
from webdataset.filters import _shuffle

from muco.data.length_buckets import LengthBuckets, LengthKey
from muco.data.position import BatchStats, ResumePoint, SharedCounts, SharedEpoch, WindowPosition, WorkerPosition
from muco.data.seeds import stable_seed
from muco.data.skips import SkipLog
from muco.data.tar_reader import TarReader

log = logging.getLogger("muco.data")
MAX_CONSECUTIVE_FAILURES = 1000  # a worker whose every sample fails has a bug or wrong data, not bad luck


@dataclass
class StreamConfig:
    """How one rank reads its shards; what a record holds is the decoder's business."""

    sources: list[list[str]]  # shard URLs per source
    batch_size: int
    weights: list[float] | None = None
    resampled: bool = True
    shuffle_buffer: int = 1000  # raw samples per worker (shared by the sources); <= 1: no shuffling
    seed: int = 0
    samples_per_epoch: int | None = None  # global; None: one pass over each rank's shards
    train: bool = True  # False: no shuffling, epoch fixed to 0, partial last batch kept
    skip_file: str | None = None  # every skipped sample is appended here (the run directory's skipped.jsonl)
    length_bucketing: int = 0  # training only: batches of similar length cut from windows of this many batches

    def __post_init__(self) -> None:
        if self.length_bucketing < 0:  # checked where the DataModule's setup builds the config
            raise ValueError(f"data.length_bucketing must be >= 0 (0: off), got {self.length_bucketing}")


# decode(raw sample, epoch) -> one collator input; raises on a bad sample
Decoder = Callable[[dict[str, Any], int], Any]
# collate(samples) -> a batch dict
Collator = Callable[[Sequence[Any]], dict[str, Any]]
# arrange(samples of a batch, rng) -> the samples to collate (e.g. one turn order shared by the batch)
Arranger = Callable[[list[Any], random.Random], list[Any]]


def _weighted_mix(streams: list[Iterator], weights: list[float], rng: random.Random,
                  longest: bool) -> Iterator:
    streams, weights = list(streams), list(weights)
    while streams:
        i = rng.choices(range(len(streams)), weights)[0]
        try:
            yield next(streams[i])
        except StopIteration:
            if not longest:
                return
            del streams[i], weights[i]


class ShardStream(IterableDataset):
    """Collated batches for one rank: ``decode`` turns each raw sample into a collator input (raising on a bad
    one), ``collate`` makes a batch of ``cfg.batch_size`` of them, ``arrange`` (optional) re-arranges a batch's
    samples first with a per-batch seeded RNG. ``length`` (the record kind's length estimate) is needed with
    ``cfg.length_bucketing``. ``len()`` is the batch count per rank when it is fixed."""

    def __init__(self, cfg: StreamConfig, decode: Decoder, collate: Collator, rank: int = 0, world_size: int = 1,
                 epoch: SharedEpoch | None = None, arrange: Arranger | None = None,
                 length: LengthKey | None = None) -> None:
        super().__init__()
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} outside world size {world_size}")
        self.cfg, self.rank, self.world_size = cfg, rank, world_size
        self.decode, self.collate, self.arrange = decode, collate, arrange
        self.buckets: LengthBuckets | None = None
        if cfg.length_bucketing and cfg.train:  # validation batches keep the stream order (nothing to gain)
            if length is None:
                raise ValueError("data.length_bucketing needs a record kind with a length_key")
            self.buckets = LengthBuckets(length, cfg.length_bucketing, cfg.batch_size)
        self.epoch = epoch
        spe = cfg.samples_per_epoch
        self.num_batches = None if spe is None else spe // (world_size * cfg.batch_size)  # same on every rank
        self.resume: ResumePoint | None = None  # set by the DataModule before the first iterator of a resume
        self.position = WorkerPosition()  # of the epoch this worker is iterating
        self._skip_log = SkipLog(path=cfg.skip_file)
        self._read_tar = TarReader(self._tar_error)
        self._failures = 0
        self._epoch, self._w, self._wid = 0, 0, ""
        self._replay_raw = -1  # a resumed window is decoded again up to here: its skips were logged already
        self.skip_counts: SharedCounts | None = None  # per-worker skip counts the training process reads

    def __len__(self) -> int:
        if self.num_batches is None:
            raise TypeError("this stream makes one pass over its shards; its length is unknown")
        return self.num_batches

    def __iter__(self) -> Iterator[dict[str, Any]]:
        info = get_worker_info()
        lw, nw = (info.id, info.num_workers) if info is not None else (0, 1)
        epoch = self.epoch.get_value() if (self.epoch is not None and self.cfg.train) else 0
        point = self.resume if (self.cfg.train and self.resume is not None and self.resume.epoch == epoch) else None
        # a resumed epoch continues the batch round-robin where it stopped: loader worker 0 takes the
        # logical worker whose batch came next, so batches arrive in the uninterrupted run's order
        w = lw if point is None else (lw + point.batches) % nw
        done = point.workers[w] if point is not None and w < len(point.workers) else None
        n = self.num_batches
        quota = None if n is None else n // nw + (w < n % nw)  # this worker's batches in the epoch
        wid = f"r{self.rank}w{w}" if self.cfg.train else f"val-r{self.rank}w{w}"
        self._epoch, self._w, self._wid = epoch, w, wid
        self._replay_raw = -1
        if self.buckets is None:
            self.position = WorkerPosition() if done is None else WorkerPosition.restore(done)
            batches = self._batches(self._samples(epoch, w, nw, wid, self.position.raw), epoch, wid, w)
        else:
            self.position = pos = WindowPosition() if done is None else WindowPosition.restore(done)
            # back to the start of the current window: read past what came before, decode the window again
            self._replay_raw, drop = (-1 if done is None else pos.raw), pos.window_batches
            pos.raw, pos.skipped = pos.window_raw, pos.window_skipped
            batches = self._bucketed(self._samples(epoch, w, nw, wid, pos.raw), epoch, wid, w, quota, drop)
        if quota is not None:  # split over workers
            batches = islice(batches, max(0, quota - self.position.batches))
        return self._closing(batches, wid)

    def _closing(self, batches: Iterator[dict[str, Any]], wid: str) -> Iterator[dict[str, Any]]:
        try:
            yield from batches
        finally:  # also when the loader stops pulling (the epoch's batch count is reached)
            self._skip_log.close(wid, self.position.skipped)

    # -- stages ------------------------------------------------------------------------------------------
    def _shard_urls(self, src: int, epoch: int, w: int, nw: int, rep: int) -> Iterator[str]:
        urls, cfg = self.cfg.sources[src], self.cfg
        if cfg.resampled:  # with replacement, independent per (epoch, rank, worker)
            rng = random.Random(stable_seed("shards", cfg.seed, epoch, self.rank, w, src))
            while True:
                yield urls[rng.randrange(len(urls))]
        order = list(urls)
        if cfg.train:  # the same order on every rank, so the strided split stays disjoint
            random.Random(stable_seed("order", cfg.seed, epoch, rep, src)).shuffle(order)
        if cfg.train or len(order) >= self.world_size:
            order = order[self.rank :: self.world_size]
        # else (validation with fewer shards than ranks): every rank reads every shard
        yield from order[w::nw]

    def _source(self, src: int, epoch: int, w: int, nw: int, wid: str) -> Iterator[dict]:
        """Raw samples of one source, shuffled within each pass over the shards, so a repeated
        (non-resampled) pass never leaks samples into the previous one's shuffle buffer."""
        cfg = self.cfg
        repeat = self.num_batches is not None and not cfg.resampled
        rep = 0
        while True:
            n = 0
            raw = (r for url in self._shard_urls(src, epoch, w, nw, rep) for r in self._read_tar(url, wid))
            if cfg.train and cfg.shuffle_buffer > 1:  # shuffle raw bytes: far smaller than decoded images
                size = max(2, cfg.shuffle_buffer // len(cfg.sources))  # the memory budget is for all sources
                rng = random.Random(stable_seed("shuffle", cfg.seed, epoch, self.rank, w, src, rep))
                raw = _shuffle(raw, size, min(size, 100), rng=rng)
            for sample in raw:
                n += 1
                yield sample
            if not repeat:
                return
            if n == 0:  # repeating an empty pass would spin forever
                raise RuntimeError(f"worker {wid} read no sample from its shards of source {src}")
            rep += 1

    def _tar_error(self, url: str, key: str | None, reason: str) -> None:
        self._skip(self._wid, url, key, reason)

    def _samples(self, epoch: int, w: int, nw: int, wid: str, consumed: int = 0) -> Iterator[Any]:
        """Decoded samples; the first ``consumed`` raw samples (a resumed epoch's) are read past, not decoded.
        Re-reading them replays the shard order, the shuffle buffer and the source mix exactly."""
        cfg = self.cfg
        streams = [self._source(s, epoch, w, nw, wid) for s in range(len(cfg.sources))]
        if len(streams) == 1:
            raw: Iterator[dict] = streams[0]
        else:
            rng = random.Random(stable_seed("mix", cfg.seed, epoch, self.rank, w))
            raw = _weighted_mix(streams, cfg.weights or [1.0] * len(streams), rng, self.num_batches is None)
        for _ in islice(raw, consumed):
            pass
        for sample in raw:
            self.position.raw += 1
            try:
                out = self.decode(sample, epoch)
            except Exception as e:  # the skip handler: any failure of one sample drops that sample only
                self._skip(wid, sample.get("__url__", "?"), sample.get("__key__"), f"{type(e).__name__}: {e}")
                continue
            self._failures = 0
            yield out

    def _batches(self, samples: Iterator[Any], epoch: int, wid: str,
                 w: int = 0) -> Iterator[dict[str, Any]]:
        bs, buf = self.cfg.batch_size, []
        for s in samples:
            buf.append(s)
            if len(buf) == bs:
                yield from self._collate(self._batch_order(buf, epoch, wid), epoch, wid, w)
                buf = []
        if buf and not self.cfg.train:  # drop_last for training only
            yield from self._collate(buf, epoch, wid, w)

    def _bucketed(self, samples: Iterator[Any], epoch: int, wid: str, w: int, quota: int | None,
                  drop: int = 0) -> Iterator[dict[str, Any]]:
        """Training batches of similar length: each window of decoded samples is sorted, cut and shuffled by
        :class:`LengthBuckets`; the first ``drop`` batches of the first window were made before a resume."""
        assert self.buckets is not None and isinstance(self.position, WindowPosition)
        pos, bs = self.position, self.cfg.batch_size
        while True:
            want = self.buckets.window_batches(pos.window, quota) * bs
            buf = list(islice(samples, want))
            # a one-pass stream's end: drop the last partial batch in stream order, as without bucketing
            buf = buf[: len(buf) // bs * bs]
            if not buf:
                return
            rng = random.Random(stable_seed("length-buckets", self.cfg.seed, epoch, self.rank, w, pos.window))
            batches = self.buckets.batches(buf, rng)
            for i, batch in enumerate(batches):
                pos.window_batches = i + 1
                if i + 1 == len(batches):  # the window is done: a resume from here starts with the next one
                    pos.window += 1
                    pos.window_raw, pos.window_skipped, pos.window_batches = pos.raw, pos.skipped, 0
                if i >= drop:  # (the first ones of a resumed window were made before the checkpoint)
                    yield from self._collate(self._batch_order(batch, epoch, wid), epoch, wid, w)
            drop = 0
            if len(buf) < want:
                return

    def _batch_order(self, buf: list[Any], epoch: int, wid: str) -> list[Any]:
        if self.arrange is None:
            return buf
        self.position.batch_no += 1
        return self.arrange(buf, random.Random(stable_seed("batch-order", self.cfg.seed, epoch, wid,
                                                            self.position.batch_no)))

    def _collate(self, buf: list[Any], epoch: int, wid: str, w: int = 0) -> Iterator[dict[str, Any]]:
        try:
            batch = self.collate(buf)
        except Exception as e:  # the decoder validated every sample; this is a last resort
            for s in buf:
                self._skip(wid, "?", s.key, f"collation failed ({type(e).__name__}: {e})")
            return
        pos = self.position
        pos.samples += len(buf)
        pos.batches += 1
        batch["stats"] = BatchStats(worker=wid, worker_index=w, epoch=epoch, train=self.cfg.train,
                                    skipped=pos.skipped, samples=pos.samples, position=replace(pos))
        yield batch

    def _skip(self, wid: str, url: str, key: str | None, err: object) -> None:
        self.position.skipped += 1
        self._failures += 1
        if self.position.raw > self._replay_raw:  # else a resumed window's sample, shared and logged before
            if self.skip_counts is not None and self.cfg.train:
                self.skip_counts.add(self._w)
            record = {"split": "train" if self.cfg.train else "val", "rank": self.rank, "epoch": self._epoch,
                      "raw": self.position.raw}
            self._skip_log(wid, url, key, err, self.position.skipped, record)
        if self._failures >= MAX_CONSECUTIVE_FAILURES:  # fail loudly instead of spinning over bad data
            raise RuntimeError(f"worker {wid}: {self._failures} samples in a row failed; last: {key!r} of "
                               f"{url}: {err}")
