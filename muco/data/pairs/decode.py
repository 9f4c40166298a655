"""The streaming fine-tuning dataset: ``M3TStream``'s machinery (shard split, shuffling, skip handler, stats,
equal batch counts) with a pair decode step (docs/method.md §8.2, §8.4).

Per sample, in a DataLoader worker, from one RNG seeded by (global seed, epoch, key) (``sample_rng``), in this
order: the masked counterpart of the positive (shown in the query sequence), the masked counterpart of the query
(shown in the target sequence), then the index of the one hard negative used this epoch. Only the images used
(query, positive, the drawn negative) are decoded.
"""

from __future__ import annotations

import random
from typing import Any

from muco.data.pairs.collate import FinetuneCollator, PairSample
from muco.data.pairs.masking import MaskingConfig, counterpart_text, mask_words
from muco.data.pairs.records import PairRecord, Side
from muco.data.seeds import sample_rng
from muco.data.stream import M3TStream, SharedEpoch, StreamConfig, load_image
from muco.inputs.image_policy import ImagePolicy
from muco.inputs.sequence import BadSampleError


def masked_counterpart(side: Side, rng: random.Random, cfg: MaskingConfig) -> str:
    """The side's user text with its image replaced by its caption, then masked (docs/method.md §8.2)."""
    return mask_words(counterpart_text(side.text, side.caption, side.image is not None), rng, cfg)


def _image(raw: dict[str, Any], member: str | None, policy: ImagePolicy) -> Any:
    if member is None:
        return None
    data = raw.get(member.lower())
    if data is None:
        raise BadSampleError(f"missing image member .{member}")
    return load_image(data, policy)


def decode_pair(raw: dict[str, Any], cfg: StreamConfig, epoch: int, masking: MaskingConfig) -> PairSample:
    """Raw tar members -> a validated pair with its counterparts masked and its negative drawn."""
    key = raw["__key__"]
    if "json" not in raw:
        raise BadSampleError("missing member .json")
    rec = PairRecord.from_json(key, raw["json"])  # types, captions of image sides, reserved strings
    rng = sample_rng(cfg.seed, epoch, key)
    masked_pos = masked_counterpart(rec.positive, rng, masking)
    masked_qry = masked_counterpart(rec.query, rng, masking)
    neg = rec.negatives[rng.randrange(len(rec.negatives))] if rec.negatives else None
    policy = cfg.image_policy
    return PairSample(
        key=key, qry_text=rec.query.text, qry_image=_image(raw, rec.query.image, policy),
        pos_text=rec.positive.text, pos_image=_image(raw, rec.positive.image, policy),
        masked_pos=masked_pos, masked_qry=masked_qry,
        neg_text=None if neg is None else neg.text,
        neg_image=None if neg is None else _image(raw, neg.image, policy),
    )


class PairStream(M3TStream):
    """Collated fine-tuning batches for one rank (``StreamConfig``'s turn fields are unused)."""

    def __init__(self, cfg: StreamConfig, collator: FinetuneCollator, rank: int = 0, world_size: int = 1,
                 epoch: SharedEpoch | None = None, masking: MaskingConfig | None = None) -> None:
        super().__init__(cfg, collator, rank, world_size, epoch)  # type: ignore[arg-type]
        self.masking = masking or MaskingConfig()

    def decode(self, raw: dict[str, Any], epoch: int) -> PairSample:
        return decode_pair(raw, self.cfg, epoch, self.masking)
