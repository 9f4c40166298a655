"""Pair decoding, the stream's per-sample stage for fine-tuning (docs/method.md §8.2, §8.4).

Per sample, in a DataLoader worker, from one RNG seeded by (global seed, epoch, key) (``sample_rng``), in this
order: the masked counterpart of the positive (shown in the query sequence), the masked counterpart of the query
(shown in the target sequence), then the index of the one hard negative used this epoch. Only the images used
(query, positive, the drawn negative) are decoded.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from typing import Any

from muco.data.images import load_image
from muco.data.pairs.collate import PairSample
from muco.data.pairs.masking import MaskingConfig, counterpart_text, mask_words
from muco.data.pairs.records import PairRecord, Side
from muco.data.seeds import sample_rng
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


@dataclass
class PairDecoder:
    """``decoder(raw, epoch)`` -> a :class:`PairSample` with its counterparts masked and its negative drawn;
    raises on any problem (the stream skips the sample)."""

    image_policy: ImagePolicy
    seed: int = 0
    masking: MaskingConfig = field(default_factory=MaskingConfig)

    def __call__(self, raw: dict[str, Any], epoch: int) -> PairSample:
        key = raw["__key__"]
        if "json" not in raw:
            raise BadSampleError("missing member .json")
        rec = PairRecord.from_json(key, raw["json"])  # types, captions of image sides, reserved strings
        rng = sample_rng(self.seed, epoch, key)
        masked_pos = masked_counterpart(rec.positive, rng, self.masking)
        masked_qry = masked_counterpart(rec.query, rng, self.masking)
        neg = rec.negatives[rng.randrange(len(rec.negatives))] if rec.negatives else None
        policy = self.image_policy
        return PairSample(
            key=key, qry_text=rec.query.text, qry_image=_image(raw, rec.query.image, policy),
            pos_text=rec.positive.text, pos_image=_image(raw, rec.positive.image, policy),
            masked_pos=masked_pos, masked_qry=masked_qry,
            neg_text=None if neg is None else neg.text,
            neg_image=None if neg is None else _image(raw, neg.image, policy),
        )
