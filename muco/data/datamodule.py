"""``MuCoDataModule``: streaming batches of one record kind for Lightning (configured from YAML by LightningCLI).

The record kind (``records``: :class:`~muco.data.m3t.kind.M3TRecords` for pretraining, the default, or
:class:`~muco.data.pairs.kind.PairRecords` for fine-tuning) says what a record holds; everything else here —
shard resolution, the rank/worker split, equal batch counts, validation, skip accounting and exact resume — is
the same for every kind.

Training: ``resampled=True`` draws shards with replacement per (seed, epoch, rank, worker);
``resampled=False`` splits a per-epoch shard order across ranks, then workers (needs >= world_size *
num_workers shards per source). Either way every rank yields exactly ``samples_per_epoch // (world_size *
batch_size)`` batches per epoch (uneven ranks hang DDP), split across workers; a short non-resampled pass is
repeated to fill it.

Validation reads held-out shards once, without resampling or shuffling, partial last batch kept. Each rank
reads a disjoint strided subset of the shards (``shards[rank::world_size]``, then split over workers), so the
union over ranks is the whole set. With fewer val shards than ranks every rank reads all of them (duplicated
work, same metrics). Ranks may then run different numbers of val batches: validation steps must not run
per-step collectives; epoch-level ``self.log(..., sync_dist=True)`` is fine.

Resume (:mod:`muco.data.progress`): ``state_dict`` holds every rank's exact position (epoch, batches consumed,
and per dataloader worker the raw samples read and batches delivered, as of the last batch training took); after
``load_state_dict`` the next iterator re-enters that epoch and every worker reads past what was trained, without
decoding it, so the resumed run sees the uninterrupted run's batches in its order (same samples, turn draws and
negatives). A resume on another world size or worker count re-splits the stream: it warns and starts the next
epoch.
"""

from __future__ import annotations

import json
import logging
import math
import os
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import torch
from lightning.pytorch import LightningDataModule
from torch.utils.data import DataLoader
from transformers import PreTrainedTokenizerBase

from muco.components import plain
from muco.data.kinds import RecordKind, build_record_kind
from muco.data.m3t.kind import M3TRecords
from muco.data.pairs.kind import PairRecords
from muco.data.position import BatchStats, SharedCounts, SharedEpoch
from muco.data.progress import DataProgress
from muco.data.shards import ShardSet, peek_first_json, resolve_shards
from muco.data.skips import SKIP_FILE
from muco.data.stream import ShardStream, StreamConfig
from muco.distributed import gather_objects
from muco.inputs.image_policy import ImagePolicy

log = logging.getLogger("muco.data")


class EpochLoader(DataLoader):
    """A DataLoader that announces each new iterator (epoch) before its workers read the shared epoch.

    It carries its own ``torch.Generator``: creating an iterator draws the workers' base seed from it instead
    of from the global RNG, so data loading never moves the random state that dropout uses (exact resume)."""

    def __init__(self, dataset: ShardStream, on_iter: Callable[[], None] | None = None, seed: int = 0,
                 **kw: Any) -> None:
        super().__init__(dataset, batch_size=None, generator=torch.Generator().manual_seed(seed), **kw)
        self._on_iter = on_iter

    def __iter__(self) -> Iterator[dict]:
        if self._on_iter is not None:
            self._on_iter()  # before the workers (re)create their iterators: they read the shared epoch
        return super().__iter__()


class MuCoDataModule(LightningDataModule):
    def __init__(
        self,
        train_shards: str | list[str],
        val_shards: str | list[str] | None = None,
        train_weights: list[float] | None = None,
        records: RecordKind | None = None,
        batch_size: int = 8,
        val_batch_size: int | None = None,
        num_workers: int = 2,
        resampled: bool = True,
        shuffle_buffer: int = 1000,
        samples_per_epoch: int | None = None,
        seed: int = 0,
        tokenizer: str | None = None,
        image_policy: str = "tiny",
        persistent_workers: bool = True,
        prefetch_factor: int = 2,
        pin_memory: bool = False,
        length_bucketing: int = 0,
    ) -> None:
        """``train_shards``: a brace pattern / glob / manifest.json, or a list of them (one source); with
        ``train_weights`` each list entry is one source, mixed per sample with those weights.
        ``records``: the record kind and its options (default: M3T records with 7 turns per sample).
        ``batch_size`` is per device (images for M3T, pairs for pairs); ``samples_per_epoch`` is global (all
        ranks). ``tokenizer``: None (default) uses the model's tokenizer (attached by the trainer, so one
        tokenizer serves model and data); set it (``tiny`` | ``qwen-offline`` | a local directory) for use
        without a trainer. ``length_bucketing``: 0 (off) or a window in batches: each training worker sorts
        that many batches' worth of samples by length and cuts them into batches of similar length, for less
        padding (:mod:`muco.data.length_buckets`)."""
        hparams = {k: v for k, v in locals().items() if k not in ("self", "__class__", "tokenizer")}
        super().__init__()
        self.records = M3TRecords() if records is None else build_record_kind(records)
        # stored in checkpoints, so a run's data config can be recovered (plain values only: the record kind as
        # its class_path/init_args); the tokenizer is the model's (Lightning refuses equal hparam keys with
        # different values), recorded once resolved in setup
        self.save_hyperparameters({k: plain(v) for k, v in {**hparams, "records": self.records}.items()})
        self.train_shards, self.val_shards, self.train_weights = train_shards, val_shards, train_weights
        self.batch_size, self.val_batch_size, self.num_workers = batch_size, val_batch_size, num_workers
        self.resampled, self.shuffle_buffer = resampled, shuffle_buffer
        self.samples_per_epoch, self.seed = samples_per_epoch, seed
        self.tokenizer, self.image_policy = tokenizer, image_policy
        self.persistent_workers, self.prefetch_factor, self.pin_memory = (
            persistent_workers, prefetch_factor, pin_memory)
        self.length_bucketing = length_bucketing
        self.train_config: StreamConfig | None = None
        self.val_config: StreamConfig | None = None
        self.policy: ImagePolicy | None = None
        self.collator: Callable | None = None
        self._source_info: dict[str, Any] = {}  # split -> what the kind learned from its first source
        self._train_samples: int | None = None  # training samples in the manifests, when they say
        self._shared_epoch: SharedEpoch | None = None  # created in setup (holds shared memory)
        self.progress = DataProgress(num_workers)
        self._train_stream: ShardStream | None = None
        self._epoch_listeners: list[Callable[[int], None]] = []

    # -- setup: every check that can fail runs here, before the first step --------------------------------
    def setup(self, stage: str | None = None) -> None:
        rank, world = self.dist_info()
        if self.batch_size < 1 or (self.val_batch_size is not None and self.val_batch_size < 1):
            raise ValueError(f"data.batch_size must be >= 1 (samples per device), got {self.batch_size}")
        self.records.validate()
        if self.num_workers < 0:
            raise ValueError(f"data.num_workers must be >= 0, got {self.num_workers}")
        self.policy = policy = ImagePolicy.preset(self.image_policy)
        if self._shared_epoch is None:
            self._shared_epoch = SharedEpoch(max(0, self.progress.epoch))
            self.progress.skip_counts = SharedCounts(max(1, self.num_workers))
        skip_file = None
        run_dir = getattr(self.trainer, "default_root_dir", None)
        if run_dir is not None:  # every skipped sample, with shard, key and reason, in the run directory
            os.makedirs(run_dir, exist_ok=True)
            skip_file = os.path.join(run_dir, SKIP_FILE)
        if stage in (None, "fit"):
            self.train_config = self._train_config(world)
            self.train_config.skip_file = skip_file
            self.records.load(self._train_samples)
        if self.val_shards is not None and stage in (None, "fit", "validate"):
            val = resolve_shards(self.val_shards)
            self._source_info["val"] = self._check_source(val, "data.val_shards")
            self.val_config = StreamConfig(
                sources=[val.urls], batch_size=self.val_batch_size or self.batch_size, resampled=False,
                seed=self.seed, train=False, skip_file=skip_file)
        if self.collator is None:
            # the stream brings images to the policy's final size; the collator's prepare keeps them as they are
            self.collator = self.records.collator(self.build_tokenizer(), policy)
        log.info("data on rank %d/%d: %s", rank, world, self.describe())

    def build_tokenizer(self) -> PreTrainedTokenizerBase:
        """The attached model's tokenizer (``data.tokenizer`` unset or equal to ``model.tokenizer``), else
        ``data.tokenizer`` built on its own (a DataModule used without a trainer)."""
        from muco.inputs.tokenizer import build_tokenizer

        module = self.trainer.lightning_module if self.trainer is not None else None
        spec = module.hparams.get("tokenizer") if module is not None else None
        if spec is not None and self.tokenizer is not None and self.tokenizer != spec:
            raise ValueError(f"data.tokenizer={self.tokenizer!r} differs from model.tokenizer={spec!r}; remove "
                             "data.init_args.tokenizer: the data uses the model's tokenizer")
        if spec is None and self.tokenizer is None:
            raise ValueError("data.tokenizer is not set and no model with a tokenizer is attached; pass the "
                             "DataModule to trainer.fit with a MuCoModule, or set data.tokenizer (tiny | "
                             "qwen-offline | a local Qwen2-VL directory)")
        self.tokenizer = self.hparams["tokenizer"] = spec or self.tokenizer  # checkpoints record the one used
        own = getattr(module, "tokenizer", None)
        return own if spec is not None and isinstance(own, PreTrainedTokenizerBase) else build_tokenizer(self.tokenizer)

    def _train_config(self, world: int) -> StreamConfig:
        if self.train_weights is not None:
            specs = [self.train_shards] if isinstance(self.train_shards, str) else list(self.train_shards)
            if len(specs) != len(self.train_weights):
                raise ValueError(f"data.train_weights has {len(self.train_weights)} weights but "
                                 f"data.train_shards has {len(specs)} sources; give one weight per source")
            if not all(math.isfinite(w) and w > 0 for w in self.train_weights):
                raise ValueError(f"data.train_weights must all be > 0, got {self.train_weights}")
            sets = [resolve_shards(s) for s in specs]
        else:
            sets = [resolve_shards(self.train_shards)]
        self._source_info["train"] = self._check_source(sets[0], "data.train_shards")
        counts = [s.num_samples for s in sets]
        self._train_samples = sum(counts) if all(c is not None for c in counts) else None  # type: ignore[arg-type]
        if self._train_samples == 0:
            raise ValueError(f"data.train_shards: the manifests list 0 samples ({self._specs()}); the conversion "
                             "wrote nothing or is unfinished: re-run `muco data convert`")
        per_epoch = self.samples_per_epoch
        if per_epoch is None and all(c is not None for c in counts):
            per_epoch = sum(counts)  # type: ignore[arg-type]  # one epoch ~ one pass (manifest counts)
        if per_epoch is None and (self.resampled or world > 1):
            why = "resampled streams are endless" if self.resampled else "ranks must yield equal batch counts"
            raise ValueError(f"data.samples_per_epoch is required ({why}) when the shards are not given as "
                             "manifest.json files; set it, e.g. to the number of training samples")
        if per_epoch is not None and per_epoch < world * self.batch_size:
            raise ValueError(
                f"data.samples_per_epoch={per_epoch} is smaller than world_size*batch_size="
                f"{world}*{self.batch_size}: no rank would get a single batch; raise it")
        if not self.resampled:
            need = world * max(1, self.num_workers)
            for spec, s in zip(self._specs(), sets):
                if len(s.urls) < need:
                    raise ValueError(
                        f"non-resampled data needs at least world_size*num_workers={need} shards per source, "
                        f"but {spec!r} has {len(s.urls)}; re-shard smaller (--max-samples-per-shard), lower "
                        "data.num_workers, or set data.resampled=true")
        return StreamConfig(
            sources=[s.urls for s in sets], batch_size=self.batch_size, weights=self.train_weights,
            resampled=self.resampled, shuffle_buffer=self.shuffle_buffer, seed=self.seed,
            samples_per_epoch=per_epoch, train=True, length_bucketing=self.length_bucketing)

    def _specs(self) -> list:
        if self.train_weights is None:
            return [self.train_shards]
        return [self.train_shards] if isinstance(self.train_shards, str) else list(self.train_shards)

    def _check_source(self, shards: ShardSet, name: str) -> Any:
        """Refuse shards of another record kind (by their first record), then let the kind check its settings
        against the source."""
        self._check_kind(shards, name)
        return self.records.check_source(shards, name)

    def _check_kind(self, shards: ShardSet, name: str) -> None:
        url = shards.urls[0]
        try:
            first = peek_first_json(url)
            record = None if first is None else json.loads(first[1])
        except Exception as e:  # the stream will skip a bad record; setup only guards the configuration
            log.warning("could not read the first record of %s (%s); record kind not checked", url, e)
            return
        if first is None or not isinstance(record, Mapping) or self.records.matches(record):
            return
        for other in known_record_kinds():
            if other.matches(record):
                raise ValueError(f"{name}: {url} holds {other.label} (first: {first[0]!r}), not "
                                 f"{self.records.label}; {other.hint}, or {self.records.convert_hint}")

    def use_negatives(self, negatives: Any) -> None:
        """Train with other mined negatives (a ``data.records.negatives`` value; None: in-batch only) from the
        next training dataloader on; the record kind must carry mined negatives (M3T records)."""
        use = getattr(self.records, "use_negatives", None)
        if use is None:
            raise ValueError(f"{self.records.label} carry no mined negatives; rounds of mined negatives need "
                             "data.records: muco.data.m3t.kind.M3TRecords")
        use(negatives, self._train_samples)
        if self._train_stream is not None:  # a loader built already: its next iterator's workers take them
            self._train_stream.decode = self._decoder("train")

    def _decoder(self, split: str) -> Any:
        assert self.policy is not None  # set up
        return self.records.decoder(self.policy, self.seed, split == "train", self._source_info.get(split))

    # -- loaders ------------------------------------------------------------------------------------------
    def make_dataset(self, split: str = "train", rank: int | None = None,
                     world_size: int | None = None) -> ShardStream:
        """The stream of one rank (explicit rank/world_size let tests simulate several ranks)."""
        cfg = self.train_config if split == "train" else self.val_config
        if cfg is None or self.collator is None or self.policy is None:
            raise RuntimeError(f"no {split} data: call setup() first (validation needs data.val_shards)")
        if rank is None or world_size is None:
            rank, world_size = self.dist_info()
        train = split == "train"
        decoder = self._decoder(split)
        stream = ShardStream(cfg, decoder, self.collator, rank, world_size, self._shared_epoch if train else None,
                             arrange=self.records.arranger(train), length=self.records.length_key(self.policy))
        if train:
            stream.skip_counts = self.progress.skip_counts
        return stream

    def _loader(self, ds: ShardStream, workers: int, train: bool) -> DataLoader:
        kw: dict[str, Any] = {"num_workers": workers, "pin_memory": self.pin_memory}
        if workers > 0:
            kw.update(persistent_workers=self.persistent_workers, prefetch_factor=self.prefetch_factor)
        if train:
            return EpochLoader(ds, on_iter=self._begin_epoch, seed=self.seed, **kw)
        return EpochLoader(ds, seed=self.seed, **kw)

    def train_dataloader(self) -> DataLoader:
        self._train_stream = self.make_dataset("train")
        return self._loader(self._train_stream, self.num_workers, train=True)

    def val_dataloader(self) -> DataLoader | list:
        if self.val_config is None and self.collator is not None:
            return []  # no data.val_shards: Lightning skips the validation loop
        ds = self.make_dataset("val")
        rank, world = ds.rank, ds.world_size
        urls = ds.cfg.sources[0]
        mine = len(urls[rank::world]) if len(urls) >= world else len(urls)
        return self._loader(ds, min(self.num_workers, mine), train=False)  # no idle val workers

    # -- epochs and resume --------------------------------------------------------------------------------
    def add_epoch_listener(self, listener: Callable[[int], None]) -> None:
        """Call ``listener(epoch)`` when a training iterator of data epoch ``epoch`` begins, before its workers
        start (on every rank, in the training process): the last moment to change what the epoch reads."""
        self._epoch_listeners.append(listener)

    def _begin_epoch(self) -> None:
        epoch, point = self.progress.begin_epoch(
            None if self._train_stream is None else self._train_stream.num_batches)
        for listener in self._epoch_listeners:
            listener(epoch)
        assert self._shared_epoch is not None  # created in setup()
        self._shared_epoch.set_value(epoch)
        if self._train_stream is not None:
            self._train_stream.resume = point  # pickled into the workers this iterator starts

    def on_before_batch_transfer(self, batch: Any, dataloader_idx: int) -> Any:
        """Record the data position of every training batch as training takes it (the loader itself runs
        ahead of training by its prefetch), and the skip total so far for logging."""
        stats = batch.get("stats") if isinstance(batch, dict) else None
        if isinstance(stats, BatchStats) and stats.train:
            self.progress.took(stats, len(batch["keys"]))
            stats.skipped_total = self.progress.skipped_total()
        return batch

    @property
    def samples_seen(self) -> int:
        """This rank's samples delivered to training."""
        return self.progress.samples_seen

    def skipped_total(self) -> int:
        """Bad training samples skipped so far in this run (all epochs, all of this rank's workers)."""
        return self.progress.skipped_total()

    def state_dict(self) -> dict[str, Any]:
        """Every rank's data position (a collective: Lightning calls it on every rank when it saves)."""
        ranks = gather_objects(self.progress.state())
        return {"format": 2, "seed": self.seed, "num_workers": self.num_workers, "world_size": len(ranks),
                "epoch": self.progress.epoch, "samples_seen": sum(r["samples_seen"] for r in ranks), "ranks": ranks}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if state_dict.get("seed", self.seed) != self.seed:
            log.warning("resuming with data seed %s, checkpoint used %s", self.seed, state_dict["seed"])
        rank, world = self.dist_info()
        ranks = state_dict.get("ranks")
        if ranks is not None and (len(ranks) != world or state_dict.get("num_workers") != self.num_workers):
            log.warning(
                "data: resuming on world_size=%d with num_workers=%d from a checkpoint of world_size=%d, "
                "num_workers=%s: the stream is re-split, so training continues with the next epoch's data order "
                "instead of the exact position (no exactness promised)", world, self.num_workers, len(ranks),
                state_dict.get("num_workers"))
            ranks = None
        if ranks is None:  # an earlier checkpoint format, or a re-split: move on to the next epoch's seeds
            self.progress.restart_after(int(state_dict.get("epoch", -1)), int(state_dict.get("samples_seen", 0)))
            return
        self.progress.restore(ranks[rank])

    # -- helpers ------------------------------------------------------------------------------------------
    def dist_info(self) -> tuple[int, int]:
        """(global rank, world size): from the trainer when attached, else RANK/WORLD_SIZE, else (0, 1)."""
        trainer = self.trainer
        if trainer is not None:
            return int(trainer.global_rank), int(trainer.world_size)
        return int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))

    def describe(self) -> str:
        parts = []
        if self.train_config is not None:
            c = self.train_config
            parts.append(f"train {sum(map(len, c.sources))} shards in {len(c.sources)} source(s), "
                         f"{'resampled' if c.resampled else 'split'}, {c.samples_per_epoch} samples/epoch")
            parts.append(self.records.describe())
        if self.val_config is not None:
            parts.append(f"val {len(self.val_config.sources[0])} shards")
        return "; ".join(parts) or "not set up"


# the names Lightning stored this DataModule's state under before record kinds existed (its class name)
LEGACY_STATE_KEYS = ("M3TDataModule", "PairDataModule")


def adopt_legacy_state(checkpoint: dict[str, Any]) -> None:
    """Let a checkpoint written by the earlier ``M3TDataModule`` / ``PairDataModule`` (same state format) restore
    ``MuCoDataModule``'s data position: Lightning looks the state up by the DataModule's class name."""
    for key in LEGACY_STATE_KEYS:
        if key in checkpoint and MuCoDataModule.__qualname__ not in checkpoint:
            checkpoint[MuCoDataModule.__qualname__] = checkpoint.pop(key)


def known_record_kinds() -> list[RecordKind]:
    """One instance of every record kind the project ships (to name the kind of foreign shards)."""
    return [M3TRecords(), PairRecords()]
