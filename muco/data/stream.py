"""The streaming M3T dataset: shards -> raw samples -> decoded, turn-drawn samples -> collated batches.

Everything expensive (tar reading, JPEG decode, resize, tokenisation, patchifying, collation) runs in
DataLoader workers; the loader is built with ``batch_size=None``. Rank and world size are given explicitly
at construction (computed in the training process), so shard splitting is right whatever the worker start
method (``split_by_node`` silently does not split in spawn/forkserver workers). Every random
choice comes from a stable hash of (seed, epoch, rank, worker, ...) like open_clip, so epochs are reproducible.

Exact resume: a worker's stream within an epoch is a pure function of (seed, epoch, rank, worker), so a
:class:`ResumePoint` (each worker's raw samples read and batches delivered) lets a restarted worker read past
the samples already trained, without decoding their images, and continue with the very next batch.

Bad samples (corrupt image, missing member, bad JSON, wrong turn count, empty query, truncated tar) are
skipped, counted per worker and reported with a rate-limited warning naming the shard and key; every batch
carries ``batch["stats"]`` (worker, epoch, skips and samples of this worker in this epoch, and its
:class:`WorkerPosition`) so the training process can log them and checkpoint the exact data position.
"""

from __future__ import annotations

import io
import logging
import multiprocessing as mp
import random
import tarfile
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from itertools import islice
from typing import Any

from PIL import Image
from torch.utils.data import IterableDataset, get_worker_info
from webdataset.filters import _shuffle
from webdataset.gopen import gopen
from webdataset.tariterators import base_plus_ext

from muco.data.m3t.collate import PretrainCollator, PretrainSample
from muco.data.m3t.negatives import NegativeSampler
from muco.data.m3t.records import M3TRecord
from muco.data.m3t.turns import apply_order, draw_turns_indexed, permute_turns
from muco.data.records import MAX_SEQUENCE_CHARS, MAX_TEXT_CHARS
from muco.data.seeds import sample_rng, stable_seed
from muco.data.skips import SkipLog
from muco.inputs.image_policy import MAX_ASPECT, ImagePolicy
from muco.inputs.sequence import BadSampleError

log = logging.getLogger("muco.data")
IMAGE_EXTS = ("jpg", "jpeg", "png", "webp")
MAX_CONSECUTIVE_FAILURES = 1000  # a worker whose every sample fails has a bug or wrong data, not bad luck
MAX_EMPTY_SHARDS = 1000  # shards in a row without a single sample: an empty shard list, not a few empty shards


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
class StreamConfig:
    sources: list[list[str]]  # shard URLs per source
    batch_size: int
    turns_per_sample: int
    image_policy: ImagePolicy
    weights: list[float] | None = None
    expected_turns: int | None = None  # records with another turn count are bad samples
    resampled: bool = True
    shuffle_buffer: int = 1000  # raw samples per worker (shared by the sources); <= 1: no shuffling
    seed: int = 0
    samples_per_epoch: int | None = None  # global; None: one pass over each rank's shards
    train: bool = True  # False: no shuffling, epoch fixed to 0, partial last batch kept
    # "sample": every sample draws its own turn order (docs/method.md §5, default); "batch": one random order
    # shared by all samples of a batch, so turn positions carry no sample identity (used by the demo, whose
    # label-derived texts would otherwise let the model match query and target by turn order alone); "stored":
    # the record's stored order, never shuffled (the positional-bias ablation the paper's shuffling prevents)
    turn_order: str = "sample"
    skip_file: str | None = None  # every skipped sample is appended here (the run directory's skipped.jsonl)
    # length bounds on the drawn texts, so step time and memory are bounded by configuration (0: none)
    max_text_chars: int = MAX_TEXT_CHARS
    max_sequence_chars: int = MAX_SEQUENCE_CHARS


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


@dataclass
class ResumePoint:
    """Where one rank's stream resumes: an epoch, the batches the rank consumed in it and each logical worker's
    position (index = worker)."""

    epoch: int
    batches: int
    workers: list[dict[str, int]]


def load_image(data: bytes, policy: ImagePolicy) -> Image.Image:
    """Decode (a JPEG at a reduced DCT scale when that still covers the target) and resize once, to the
    policy's final size; the collator's ``policy.prepare`` then keeps it as it is."""
    im = Image.open(io.BytesIO(data))
    w, h = im.size
    if max(w, h) > MAX_ASPECT * min(w, h):
        raise BadSampleError(f"aspect ratio {w}x{h} > {MAX_ASPECT}")
    return policy.prepare(im, draft=True)  # decodes here: a corrupt file fails inside the skip handler


def record_and_image(raw: dict[str, Any]) -> tuple[M3TRecord, bytes]:
    """A raw sample's validated record (types, empty strings, reserved tokens) and its undecoded image."""
    ext = next((e for e in IMAGE_EXTS if e in raw), None)
    if "json" not in raw or ext is None:
        raise BadSampleError("missing member .json" if "json" not in raw else
                             f"missing image member (one of {IMAGE_EXTS})")
    return M3TRecord.from_json(raw["__key__"], raw["json"]), raw[ext]


def decode_sample(raw: dict[str, Any], cfg: StreamConfig, epoch: int,
                  negatives: NegativeSampler | None = None) -> PretrainSample:
    """Raw tar members -> a validated sample with its turns (and, with a sampler, its mined negatives) drawn;
    raises on any problem."""
    key = raw["__key__"]
    record, image_bytes = record_and_image(raw)
    n = len(record.turns)
    if cfg.expected_turns is not None and n != cfg.expected_turns:
        raise BadSampleError(f"has {n} turns, expected {cfg.expected_turns} (the data source's turn count)")
    if n < cfg.turns_per_sample:
        raise BadSampleError(f"has {n} turns, fewer than data.turns_per_sample={cfg.turns_per_sample}")
    image = load_image(image_bytes, cfg.image_policy)
    queries, targets, turns = draw_turns_indexed(record.turns, cfg.turns_per_sample,
                                                 sample_rng(cfg.seed, epoch, key), shuffle=cfg.turn_order == "sample")
    check_lengths(queries, targets, cfg)
    # the negatives' own RNG: the turn draws above do not change when negatives are on
    negs = None if negatives is None else negatives.draw_seeded(key, turns, cfg.seed, epoch)
    return PretrainSample(key=key, image=image, queries=queries, targets=targets, turns=turns, negatives=negs)


def check_lengths(queries: list[str], targets: list[str], cfg: StreamConfig) -> None:
    """A sample whose drawn texts exceed the configured bounds is skipped (a 4,000-character caption would
    widen its whole batch tenfold): each text, and the texts of the query and of the target sequence."""
    if cfg.max_text_chars:
        longest = max(map(len, queries + targets))
        if longest > cfg.max_text_chars:
            raise BadSampleError(f"a text of {longest:,} characters, over data.max_text_chars={cfg.max_text_chars:,}")
    if cfg.max_sequence_chars:
        for side, texts in (("query", queries), ("target", targets)):
            total = sum(map(len, texts))
            if total > cfg.max_sequence_chars:
                raise BadSampleError(f"{side} sequence of {total:,} text characters, over "
                                     f"data.max_sequence_chars={cfg.max_sequence_chars:,}")


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


class M3TStream(IterableDataset):
    """Collated M3T batches for one rank; ``len()`` is the batch count per rank when it is fixed."""

    def __init__(self, cfg: StreamConfig, collator: PretrainCollator, rank: int = 0, world_size: int = 1,
                 epoch: SharedEpoch | None = None, negatives: NegativeSampler | None = None) -> None:
        super().__init__()
        self.negatives = negatives  # mined negatives drawn per sample (training with data.negatives)
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} outside world size {world_size}")
        self.cfg, self.collator, self.rank, self.world_size = cfg, collator, rank, world_size
        self.epoch = epoch
        spe = cfg.samples_per_epoch
        self.num_batches = None if spe is None else spe // (world_size * cfg.batch_size)  # same on every rank
        self.resume: ResumePoint | None = None  # set by the DataModule before the first iterator of a resume
        self.position = WorkerPosition()  # of the epoch this worker is iterating
        self._skip_log = SkipLog(path=cfg.skip_file)
        self._failures = 0
        self._empty_shards = 0
        self._epoch, self._w = 0, 0
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
        self.position = WorkerPosition() if done is None else WorkerPosition(**done)
        wid = f"r{self.rank}w{w}" if self.cfg.train else f"val-r{self.rank}w{w}"
        self._epoch, self._w = epoch, w
        batches = self._batches(self._samples(epoch, w, nw, wid, self.position.raw), epoch, wid, w)
        if self.num_batches is not None:  # split over workers
            n = self.num_batches
            batches = islice(batches, max(0, n // nw + (w < n % nw) - self.position.batches))
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

    def _read_tar(self, url: str, wid: str) -> Iterator[dict]:
        """Group consecutive members by key. A truncated or corrupt tar costs the sample being read (counted
        once) and the unreadable tail; the samples before it still arrive."""
        current: dict | None = None
        reading: str | None = None  # key of the member being read when an error hits
        self._empty_shards += 1  # until this shard yields a sample
        if self._empty_shards > MAX_EMPTY_SHARDS:  # e.g. resampled draws over tars without members: never spin
            raise RuntimeError(f"worker {wid}: {MAX_EMPTY_SHARDS} shards in a row held no sample (the last: {url}); "
                               "the shards are empty or not webdataset tars: check data.train_shards / the conversion")
        try:
            with gopen(url, "rb") as stream, tarfile.open(fileobj=stream, mode="r|*") as tar:
                for info in tar:
                    base, ext = base_plus_ext(info.name)  # webdataset's rule: key up to the first dot
                    if not info.isreg() or base is None:
                        continue
                    reading = base
                    data = tar.extractfile(info).read()  # type: ignore[union-attr]
                    reading = None
                    if current is None or current["__key__"] != base:
                        if current is not None:
                            self._empty_shards = 0
                            yield current
                        current = {"__key__": base, "__url__": url}
                    current[ext.lower()] = data
        except (tarfile.TarError, OSError, EOFError, ValueError) as e:
            if current is not None and reading == current["__key__"]:
                current, reading = None, current["__key__"]  # it lost a member
            self._skip(wid, url, reading, f"unreadable tar, rest of shard skipped ({type(e).__name__}: {e})")
        if current is not None:  # complete as far as the tar goes; decoding checks its members
            self._empty_shards = 0
            yield current

    def _samples(self, epoch: int, w: int, nw: int, wid: str, consumed: int = 0) -> Iterator[PretrainSample]:
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

    def decode(self, raw: dict[str, Any], epoch: int) -> Any:
        """Raw tar members -> one collator input; raises on a bad sample (subclasses decode other kinds)."""
        return decode_sample(raw, self.cfg, epoch, self.negatives)

    def _batches(self, samples: Iterator[PretrainSample], epoch: int, wid: str,
                 w: int = 0) -> Iterator[dict[str, Any]]:
        bs, buf = self.cfg.batch_size, []
        for s in samples:
            buf.append(s)
            if len(buf) == bs:
                yield from self._collate(self._batch_order(buf, epoch, wid), epoch, wid, w)
                buf = []
        if buf and not self.cfg.train:  # drop_last for training only
            yield from self._collate(buf, epoch, wid, w)

    def _batch_order(self, buf: list[PretrainSample], epoch: int, wid: str) -> list[PretrainSample]:
        if self.cfg.turn_order != "batch":
            return buf
        self.position.batch_no += 1
        k = self.cfg.turns_per_sample
        order = random.Random(stable_seed("batch-order", self.cfg.seed, epoch, wid, self.position.batch_no)).sample(
            range(k), k)
        for s in buf:
            s.queries, s.targets = permute_turns(s.queries, s.targets, order)
            if s.turns is not None:
                s.turns = apply_order(s.turns, order)
            if s.negatives is not None:
                s.negatives = [apply_order(draw, order) for draw in s.negatives]
        return buf

    def _collate(self, buf: list[PretrainSample], epoch: int, wid: str, w: int = 0) -> Iterator[dict[str, Any]]:
        try:
            batch = self.collator(buf)
        except Exception as e:  # decode_sample validated every sample; this is a last resort
            for s in buf:
                self._skip(wid, "?", s.key, f"collation failed ({type(e).__name__}: {e})")
            return
        pos = self.position
        pos.samples += len(buf)
        pos.batches += 1
        batch["stats"] = {"worker": wid, "worker_index": w, "epoch": epoch, "train": self.cfg.train,
                          "skipped": pos.skipped, "samples": pos.samples, "position": asdict(pos)}
        yield batch

    def _skip(self, wid: str, url: str, key: str | None, err: object) -> None:
        self.position.skipped += 1
        self._failures += 1
        if self.skip_counts is not None and self.cfg.train:
            self.skip_counts.add(self._w)
        record = {"split": "train" if self.cfg.train else "val", "rank": self.rank, "epoch": self._epoch,
                  "raw": self.position.raw}
        self._skip_log(wid, url, key, err, self.position.skipped, record)
        if self._failures >= MAX_CONSECUTIVE_FAILURES:  # fail loudly instead of spinning over bad data
            raise RuntimeError(f"worker {wid}: {self._failures} samples in a row failed; last: {key!r} of "
                               f"{url}: {err}")
