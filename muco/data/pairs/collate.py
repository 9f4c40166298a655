"""Fine-tuning collation: 3-turn guided-reconstruction sequences plus one base-template hard negative
(docs/method.md §4, §8).

Batch: ``query`` / ``target`` (two ``<|emb|>`` each: turn 1 = q or p, turn 3 = q' or p'), ``negative`` (one
``<|emb|>``), ``negative_valid`` [B] (False where the sample has no negative: its slot holds the released
empty prompt ``"\\n"`` and the loss masks the column unless the module's ``released_placeholder`` is set),
``target_text_id`` / ``negative_text_id`` [B] (identity hashes for the optional same-text masks) and ``keys``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from PIL import Image
from transformers import PreTrainedTokenizerBase

from muco.inputs.image_policy import ImagePolicy
from muco.inputs.sequence import SequenceEncoder, check_user_text, text_id
from muco.inputs.templates import base_template, finetune_template, single_turn_user_text


@dataclass
class PairSample:
    """One fine-tuning pair; the masked counterparts are drawn by the data pipeline (seeded per sample)."""

    key: str
    qry_text: str
    qry_image: Image.Image | None
    pos_text: str
    pos_image: Image.Image | None
    masked_pos: str  # masked counterpart shown in the query sequence
    masked_qry: str  # masked counterpart shown in the target sequence
    neg_text: str | None = None
    neg_image: Image.Image | None = None

    @property
    def has_negative(self) -> bool:
        return self.neg_text is not None or self.neg_image is not None


# the released code's constant "junk" negative where a sample has none (docs/method.md §8.4)
EMPTY_NEGATIVE = "\n"


def identity_id(key: str, role: str, text: str, image: Image.Image | None) -> int:
    """Text id of a text-only item; an image-bearing item is unique to its sample (never equal to another)."""
    return text_id(text if image is None else f"{key}\x1f{role}\x1f{text}")


def query_sequence(s: PairSample) -> str:
    """``TRAIN(query, masked(positive))``."""
    return finetune_template(single_turn_user_text(s.qry_text, s.qry_image is not None), s.masked_pos)


def target_sequence(s: PairSample) -> str:
    """``TRAIN(positive, masked(query))``."""
    return finetune_template(single_turn_user_text(s.pos_text, s.pos_image is not None), s.masked_qry)


def negative_sequence(s: PairSample) -> str:
    """``BASE(negative)``, or the released empty prompt when the sample has none."""
    if not s.has_negative:
        return base_template(EMPTY_NEGATIVE)
    return base_template(single_turn_user_text(s.neg_text or "", s.neg_image is not None))


class FinetuneCollator:
    """3-turn guided-reconstruction batches (two `<|emb|>` per sequence) plus one base-template negative per
    sample."""

    def __init__(self, tokenizer: PreTrainedTokenizerBase, image_policy: ImagePolicy) -> None:
        self.encoder = SequenceEncoder(tokenizer, image_policy)

    def __call__(self, samples: Sequence[PairSample]) -> dict[str, Any]:
        for s in samples:
            for field_name in ("qry_text", "pos_text", "neg_text"):
                value = getattr(s, field_name)
                if value is not None:
                    check_user_text(value, s.key, field_name)
            # masked counterparts carry <|mask|> on purpose; anything else special would misalign pooling
            for field_name in ("masked_pos", "masked_qry"):
                check_user_text(getattr(s, field_name).replace("<|mask|>", ""), s.key, field_name)
        has_neg = [s.has_negative for s in samples]
        return {
            "query": self.encoder([query_sequence(s) for s in samples], [s.qry_image for s in samples]),
            "target": self.encoder([target_sequence(s) for s in samples], [s.pos_image for s in samples]),
            "negative": self.encoder([negative_sequence(s) for s in samples],
                                     [s.neg_image if h else None for s, h in zip(samples, has_neg)]),
            "negative_valid": torch.tensor(has_neg, dtype=torch.bool),
            "target_text_id": torch.tensor([identity_id(s.key, "pos", s.pos_text, s.pos_image) for s in samples],
                                           dtype=torch.long),
            "negative_text_id": torch.tensor(
                [identity_id(s.key, "neg", s.neg_text or "", s.neg_image) if h else -1 - i
                 for i, (s, h) in enumerate(zip(samples, has_neg))], dtype=torch.long),
            "keys": [s.key for s in samples],
        }
