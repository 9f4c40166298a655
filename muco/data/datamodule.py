"""``M3TDataModule``: streaming M3T pretraining batches for Lightning (configured from YAML by LightningCLI).

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

Mined negatives (``negatives``, see :mod:`muco.data.m3t.negatives`): training samples also draw hard negatives
from a ``muco mine`` sidecar (rank band, negatives per turn); batches then carry packed negative sequences
(:class:`~muco.data.m3t.collate.PretrainCollator`). Validation batches never do.

Resume: ``state_dict`` holds every rank's exact position (epoch, batches consumed, and per dataloader worker the
raw samples read and batches delivered, as of the last batch training took); after ``load_state_dict`` the
next iterator re-enters that epoch and every worker reads past what was trained, without decoding it, so the
resumed run sees the uninterrupted run's batches in its order (same samples, turn draws and negatives). A
resume on another world size or worker count re-splits the stream: it warns and starts the next epoch.
"""

from __future__ import annotations

import json
import logging
import math
import os
from collections.abc import Callable, Iterator
from typing import Any

import torch
from lightning.pytorch import LightningDataModule
from torch.utils.data import DataLoader
from transformers import PreTrainedTokenizerBase

from muco.data.m3t.collate import PretrainCollator
from muco.data.m3t.negatives import NegativeSampler, NegativesConfig, load_negatives
from muco.data.m3t.turns import TURN_ORDERS
from muco.data.records import MAX_SEQUENCE_CHARS, MAX_TEXT_CHARS
from muco.data.shards import ShardSet, is_remote, peek_first_json, resolve_shards
from muco.data.skips import SKIP_FILE
from muco.data.stream import M3TStream, ResumePoint, SharedCounts, SharedEpoch, StreamConfig
from muco.distributed import gather_objects
from muco.inputs.image_policy import ImagePolicy

log = logging.getLogger("muco.data")


class _EpochLoader(DataLoader):
    """A DataLoader that announces each new iterator (epoch) before its workers read the shared epoch.

    It carries its own ``torch.Generator``: creating an iterator draws the workers' base seed from it instead
    of from the global RNG, so data loading never moves the random state that dropout uses (exact resume)."""

    def __init__(self, dataset: M3TStream, on_iter: Callable[[], None] | None = None, seed: int = 0,
                 **kw: Any) -> None:
        super().__init__(dataset, batch_size=None, generator=torch.Generator().manual_seed(seed), **kw)
        self._on_iter = on_iter

    def __iter__(self) -> Iterator[dict]:
        if self._on_iter is not None:
            self._on_iter()  # before the workers (re)create their iterators: they read the shared epoch
        return super().__iter__()


class M3TDataModule(LightningDataModule):
    def __init__(
        self,
        train_shards: str | list[str],
        val_shards: str | list[str] | None = None,
        train_weights: list[float] | None = None,
        batch_size: int = 8,
        val_batch_size: int | None = None,
        num_workers: int = 2,
        turns_per_sample: int = 7,
        turns_per_record: int | None = None,
        max_text_chars: int = MAX_TEXT_CHARS,
        max_sequence_chars: int = MAX_SEQUENCE_CHARS,
        turn_order: str = "sample",
        resampled: bool = True,
        shuffle_buffer: int = 1000,
        samples_per_epoch: int | None = None,
        seed: int = 0,
        tokenizer: str | None = None,
        image_policy: str = "tiny",
        persistent_workers: bool = True,
        prefetch_factor: int = 2,
        pin_memory: bool = False,
        negatives: NegativesConfig | None = None,
    ) -> None:
        """``train_shards``: a brace pattern / glob / manifest.json, or a list of them (one source); with
        ``train_weights`` each list entry is one source, mixed per sample with those weights.
        ``batch_size`` is per device, in images; ``samples_per_epoch`` is global (all ranks).
        ``negatives``: mined hard negatives for training, ``{sidecar: <muco mine output dir>, band: [lo, hi],
        per_turn: n}`` (ranks inclusive, 1 = hardest; default band [1, 10], one per turn); None: in-batch only.
        ``tokenizer``: None (default) uses the model's tokenizer (attached by the trainer, so one tokenizer serves
        model and data); set it (``tiny`` | ``qwen-offline`` | a local directory) for use without a trainer.
        ``turns_per_record``: the turn count of every record (others are skipped, counted); default: the
        manifest's ``turns``; without either, records need only ``turns_per_sample`` turns.
        ``max_text_chars`` / ``max_sequence_chars``: samples whose drawn texts exceed them (one text; the texts
        of the query or the target sequence) are skipped and counted, bounding step time and memory (0: none)."""
        super().__init__()
        # stored in checkpoints, so a run's data config can be recovered; the tokenizer is the model's (Lightning
        # refuses equal hparam keys with different values), recorded once resolved in setup
        self.save_hyperparameters(ignore=["tokenizer"])
        self.train_shards, self.val_shards, self.train_weights = train_shards, val_shards, train_weights
        self.batch_size, self.val_batch_size, self.num_workers = batch_size, val_batch_size, num_workers
        self.turns_per_sample, self.turns_per_record, self.resampled = turns_per_sample, turns_per_record, resampled
        self.max_text_chars, self.max_sequence_chars = max_text_chars, max_sequence_chars
        self.turn_order = turn_order
        self.shuffle_buffer = shuffle_buffer
        self.samples_per_epoch, self.seed = samples_per_epoch, seed
        self.tokenizer, self.image_policy = tokenizer, image_policy
        self.persistent_workers, self.prefetch_factor, self.pin_memory = (
            persistent_workers, prefetch_factor, pin_memory)
        self.train_config: StreamConfig | None = None
        self.val_config: StreamConfig | None = None
        self.collator: PretrainCollator | None = None
        self.negatives = NegativesConfig.coerce(negatives)
        self.negative_sampler: NegativeSampler | None = None  # loaded once, in setup("fit")
        self._train_samples: int | None = None  # training samples in the manifests, when they say
        self._shared_epoch: SharedEpoch | None = None  # created in setup (holds shared memory)
        self._data_epoch = -1  # last epoch handed to an iterator
        self._min_epoch = 0  # the next iterator's epoch is at least this (raised on resume)
        self.samples_seen = 0  # this rank's samples delivered to training
        self._train_stream: M3TStream | None = None
        self._resume: ResumePoint | None = None  # from a checkpoint, for the next training iterator
        self._epoch_batches = 0  # training batches consumed in the current epoch (this rank)
        self._positions: dict[int, dict[str, int]] = {}  # logical worker -> position of its last consumed batch
        self._skipped_before = 0  # bad samples skipped in earlier epochs
        self._skip_counts: SharedCounts | None = None  # every worker's skips of this epoch, as they happen

    # -- setup: every check that can fail runs here, before the first step --------------------------------
    def setup(self, stage: str | None = None) -> None:
        rank, world = self.dist_info()
        if self.batch_size < 1 or (self.val_batch_size is not None and self.val_batch_size < 1):
            raise ValueError(f"data.batch_size must be >= 1 (images per device), got {self.batch_size}")
        if self.turn_order not in TURN_ORDERS:
            raise ValueError(f"data.turn_order={self.turn_order!r}; choose one of {TURN_ORDERS}")
        if self.turns_per_sample < 1:
            raise ValueError(f"data.turns_per_sample must be >= 1, got {self.turns_per_sample}")
        if self.num_workers < 0:
            raise ValueError(f"data.num_workers must be >= 0, got {self.num_workers}")
        policy = ImagePolicy.preset(self.image_policy)
        if self._shared_epoch is None:
            self._shared_epoch = SharedEpoch(max(0, self._data_epoch))
            self._skip_counts = SharedCounts(max(1, self.num_workers))
        skip_file = None
        run_dir = getattr(self.trainer, "default_root_dir", None)
        if run_dir is not None:  # every skipped sample, with shard, key and reason, in the run directory
            os.makedirs(run_dir, exist_ok=True)
            skip_file = os.path.join(run_dir, SKIP_FILE)
        if stage in (None, "fit"):
            self.train_config = self._train_config(policy, world)
            self.train_config.skip_file = skip_file
            self.train_config.max_text_chars = self.max_text_chars
            self.train_config.max_sequence_chars = self.max_sequence_chars
            if self.negatives is not None and self.negative_sampler is None:
                self.negative_sampler = load_negatives(self.negatives, self._train_samples)
        if self.val_shards is not None and stage in (None, "fit", "validate"):
            val = resolve_shards(self.val_shards)
            self.val_config = StreamConfig(
                sources=[val.urls], batch_size=self.val_batch_size or self.batch_size,
                turns_per_sample=self.turns_per_sample, image_policy=policy,
                expected_turns=self._check_turns(val, "data.val_shards"), resampled=False, seed=self.seed,
                train=False, skip_file=skip_file, max_text_chars=self.max_text_chars,
                max_sequence_chars=self.max_sequence_chars)
        if self.collator is None:
            # the stream brings images to the policy's final size; the collator's prepare keeps them as they are
            self.collator = PretrainCollator(self.build_tokenizer(), policy)
        log.info("M3T data on rank %d/%d: %s", rank, world, self.describe())

    def build_tokenizer(self) -> PreTrainedTokenizerBase:
        """The attached model's tokenizer (``data.tokenizer`` unset or equal to ``model.tokenizer``), else
        ``data.tokenizer`` built on its own (a DataModule used without a trainer)."""
        from muco.model.tokenizer import build_tokenizer

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

    def _train_config(self, policy: ImagePolicy, world: int) -> StreamConfig:
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
        expected = self._check_turns(sets[0], "data.train_shards")
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
            sources=[s.urls for s in sets], batch_size=self.batch_size,
            turns_per_sample=self.turns_per_sample, image_policy=policy, weights=self.train_weights,
            expected_turns=expected, resampled=self.resampled, shuffle_buffer=self.shuffle_buffer,
            seed=self.seed, samples_per_epoch=per_epoch, train=True, turn_order=self.turn_order)

    def _specs(self) -> list:
        if self.train_weights is None:
            return [self.train_shards]
        return [self.train_shards] if isinstance(self.train_shards, str) else list(self.train_shards)

    def _check_turns(self, shards: ShardSet, name: str) -> int | None:
        """The turn count every record of this source must have (a record with another is skipped): the
        ``data.turns_per_record`` setting, else the manifest's ``turns``; None without either (records then need
        only ``turns_per_sample`` turns). Also refuses fine-tuning pair shards, by their first record."""
        self._check_kind(shards, name)
        stated = self.turns_per_record
        if stated is not None and shards.turns is not None and stated != shards.turns:
            raise ValueError(f"data.turns_per_record={stated} but the manifest of {name} says its records have "
                             f"{shards.turns} turns; drop data.turns_per_record or point {name} at the right shards")
        turns = stated if stated is not None else shards.turns
        if turns is not None and self.turns_per_sample > turns:
            raise ValueError(f"data.turns_per_sample={self.turns_per_sample} but the records of {name} have {turns} "
                             f"turns; set data.turns_per_sample <= {turns}")
        return turns

    def _check_kind(self, shards: ShardSet, name: str) -> None:
        url = shards.urls[0]
        if is_remote(url):
            return
        try:
            first = peek_first_json(url)
            record = None if first is None else json.loads(first[1])
        except Exception as e:  # the stream will skip a bad record; setup only guards the configuration
            log.warning("could not read the first record of %s (%s); record kind not checked", url, e)
            return
        if first is not None and isinstance(record, dict) and "turns" not in record and {"query", "positive"} <= set(
                record):
            raise ValueError(
                f"{name}: {url} holds fine-tuning pairs ({first[0]!r} has query/positive, no turns), not M3T "
                "records; train pairs with muco.data.pair_datamodule.PairDataModule and "
                "muco.train.finetune_module.FinetuneModule (configs/finetune_2b.yaml)")

    # -- loaders ------------------------------------------------------------------------------------------
    def make_dataset(self, split: str = "train", rank: int | None = None,
                     world_size: int | None = None) -> M3TStream:
        """The stream of one rank (explicit rank/world_size let tests simulate several ranks)."""
        cfg = self.train_config if split == "train" else self.val_config
        if cfg is None or self.collator is None:
            raise RuntimeError(f"no {split} data: call setup() first (validation needs data.val_shards)")
        if rank is None or world_size is None:
            rank, world_size = self.dist_info()
        epoch = self._shared_epoch if split == "train" else None
        negatives = self.negative_sampler if split == "train" else None
        stream = M3TStream(cfg, self.collator, rank, world_size, epoch, negatives)
        if split == "train":
            stream.skip_counts = self._skip_counts
        return stream

    def _loader(self, ds: M3TStream, workers: int, train: bool) -> DataLoader:
        kw: dict[str, Any] = {"num_workers": workers, "pin_memory": self.pin_memory}
        if workers > 0:
            kw.update(persistent_workers=self.persistent_workers, prefetch_factor=self.prefetch_factor)
        if train:
            return _EpochLoader(ds, on_iter=self._begin_epoch, seed=self.seed, **kw)
        return _EpochLoader(ds, seed=self.seed, **kw)

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
    def _begin_epoch(self) -> None:
        trainer = self.trainer
        epoch = trainer.current_epoch if trainer is not None else self._data_epoch + 1
        epoch = max(epoch, self._min_epoch)  # never reuse an epoch's seeds, e.g. after a re-split resume
        self._data_epoch, self._min_epoch = epoch, epoch + 1
        assert self._shared_epoch is not None  # created in setup()
        self._shared_epoch.set_value(epoch)
        point, self._resume = self._resume, None
        if point is not None and point.epoch != epoch:
            point = None  # the checkpoint closed its epoch: the next one starts from its beginning
        if self._train_stream is not None:
            self._train_stream.resume = point  # pickled into the workers this iterator starts
        if point is None:
            self._skipped_before += self._skipped_this_epoch()  # the epoch that just ended
        if self._skip_counts is not None:
            self._skip_counts.reset()
        self._epoch_batches = 0 if point is None else point.batches
        self._positions = {} if point is None else {w: p for w, p in enumerate(point.workers) if p is not None}

    def on_before_batch_transfer(self, batch: Any, dataloader_idx: int) -> Any:
        """Record the data position of every training batch as training takes it (the loader itself runs
        ahead of training by its prefetch), and the skip total so far for logging."""
        stats = batch.get("stats") if isinstance(batch, dict) else None
        if stats and stats.get("train") and "position" in stats:
            self._positions[int(stats["worker_index"])] = dict(stats["position"])
            self._epoch_batches += 1
            self.samples_seen += len(batch["keys"])
            stats["skipped_total"] = self.skipped_total()
        return batch

    def _skipped_this_epoch(self) -> int:
        """Skips of the current epoch: those before the batches training took, or, where a worker got further
        (prefetching, or bad samples after its last batch), what it counted in shared memory."""
        workers = set(self._positions) | set(range(max(1, self.num_workers)))
        shared = self._skip_counts
        return sum(max(self._positions.get(w, {}).get("skipped", 0), shared.get(w) if shared else 0) for w in workers)

    def skipped_total(self) -> int:
        """Bad training samples skipped so far in this run (all epochs, all of this rank's workers)."""
        return self._skipped_before + self._skipped_this_epoch()

    def state_dict(self) -> dict[str, Any]:
        """Every rank's data position (a collective: Lightning calls it on every rank when it saves)."""
        workers = max(1, self.num_workers)
        local = {"epoch": self._data_epoch, "batches": self._epoch_batches, "samples_seen": self.samples_seen,
                 "skipped_before": self._skipped_before,
                 "workers": [self._positions.get(w) for w in range(workers)]}
        ranks = gather_objects(local)
        return {"format": 2, "seed": self.seed, "num_workers": self.num_workers, "world_size": len(ranks),
                "epoch": self._data_epoch, "samples_seen": sum(r["samples_seen"] for r in ranks), "ranks": ranks}

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
            self._data_epoch = int(state_dict.get("epoch", -1))
            self._min_epoch = self._data_epoch + 1
            self.samples_seen = int(state_dict.get("samples_seen", 0))
            return
        mine = ranks[rank]
        self._data_epoch, self._min_epoch = int(mine["epoch"]) - 1, int(mine["epoch"])
        self._resume = ResumePoint(epoch=int(mine["epoch"]), batches=int(mine["batches"]), workers=mine["workers"])
        self.samples_seen = int(mine["samples_seen"])
        self._skipped_before = int(mine.get("skipped_before", 0))

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
            if self.negatives is not None:
                parts.append(f"mined negatives ranks {self.negatives.band[0]}-{self.negatives.band[1]}, "
                             f"{self.negatives.per_turn} per turn")
        if self.val_config is not None:
            parts.append(f"val {len(self.val_config.sources[0])} shards")
        return "; ".join(parts) or "not set up"
