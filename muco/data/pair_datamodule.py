"""``PairDataModule``: streaming fine-tuning pairs for Lightning, with every option of ``M3TDataModule``
(shards / manifests / weighted sources, resampled or split mode, workers, per-device batch size,
``samples_per_epoch`` with equal batch counts per rank, seed, tokenizer, image policy, skip counts and
``stats`` in batches, resume state) plus the masking of the reconstruction counterparts (docs/method.md §8.2).
"""

from __future__ import annotations

import json
import logging

from muco.data.datamodule import M3TDataModule
from muco.data.pairs.collate import FinetuneCollator
from muco.data.pairs.decode import PairStream
from muco.data.pairs.masking import MaskingConfig
from muco.data.shards import ShardSet, is_remote, peek_first_json
from muco.inputs.image_policy import ImagePolicy

log = logging.getLogger("muco.data")


class PairDataModule(M3TDataModule):
    def __init__(
        self,
        train_shards: str | list[str],
        val_shards: str | list[str] | None = None,
        train_weights: list[float] | None = None,
        batch_size: int = 8,
        val_batch_size: int | None = None,
        num_workers: int = 2,
        resampled: bool = True,
        shuffle_buffer: int = 1000,
        samples_per_epoch: int | None = None,
        seed: int = 0,
        tokenizer: str | None = None,
        image_policy: str = "tiny",
        mask_ratio: float = 0.5,
        full_mask_prob: float = 0.5,
        collapse_mask_runs: bool = True,
        persistent_workers: bool = True,
        prefetch_factor: int = 2,
        pin_memory: bool = False,
    ) -> None:
        """Arguments as :class:`M3TDataModule` (``batch_size``: pairs per device; ``samples_per_epoch``: pairs,
        global). Masking (released defaults): each counterpart becomes a single ``<|mask|>`` with probability
        ``full_mask_prob``, else each word is masked with probability ``mask_ratio`` and runs of masks collapse
        into one (``collapse_mask_runs``). Paper-style uniform masking: ``full_mask_prob=0``,
        ``collapse_mask_runs=false``."""
        super().__init__(
            train_shards, val_shards, train_weights, batch_size, val_batch_size, num_workers,
            turns_per_sample=1, turn_order="sample", resampled=resampled, shuffle_buffer=shuffle_buffer,
            samples_per_epoch=samples_per_epoch, seed=seed, tokenizer=tokenizer, image_policy=image_policy,
            persistent_workers=persistent_workers, prefetch_factor=prefetch_factor, pin_memory=pin_memory)
        self.masking = MaskingConfig(ratio=mask_ratio, full_mask_prob=full_mask_prob,
                                     collapse_runs=collapse_mask_runs)

    def setup(self, stage: str | None = None) -> None:
        if self.collator is None:
            # the stream brings images to the policy's final size; the collator's prepare keeps them as they are
            self.collator = FinetuneCollator(self.build_tokenizer(),  # type: ignore[assignment]
                                             ImagePolicy.preset(self.image_policy))
        super().setup(stage)

    def _check_turns(self, shards: ShardSet, name: str) -> int | None:
        """Pairs have no turns: check instead that the first record is a pair, not an M3T record."""
        url = shards.urls[0]
        if is_remote(url):
            return None
        try:
            first = peek_first_json(url)
            obj = None if first is None else json.loads(first[1])
        except Exception as e:  # the stream skips bad records; setup only guards the configuration
            log.warning("could not read the first record of %s (%s); record kind not checked", url, e)
            return None
        if first is not None and isinstance(obj, dict) and "turns" in obj:
            raise ValueError(
                f"{name}: {url} holds M3T pretraining records (first: {first[0]!r}), but fine-tuning reads pair "
                "shards; convert pairs with `muco data convert --kind pairs`")
        return None

    def make_dataset(self, split: str = "train", rank: int | None = None,
                     world_size: int | None = None) -> PairStream:
        base = super().make_dataset(split, rank, world_size)
        return PairStream(base.cfg, base.collator, base.rank, base.world_size,  # type: ignore[arg-type]
                          base.epoch, self.masking)

    def describe(self) -> str:
        return "pairs: " + super().describe()
