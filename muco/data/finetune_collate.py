"""Fine-tuning collation: 3-turn guided-reconstruction sequences plus one base-template hard negative."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from PIL import Image
from transformers import PreTrainedTokenizerBase

from muco.data.collate import SequenceEncoder, check_user_text
from muco.data.image_policy import ImagePolicy
from muco.data.templates import base_template, finetune_template, single_turn_user_text


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


# the released code's constant "junk" negative where a sample has none (METHOD.md §8.4)
EMPTY_NEGATIVE = "\n"


class FinetuneCollator:
    """3-turn guided-reconstruction batches (two `<|emb|>` per sequence) plus one base-template negative
    per sample. A missing negative is encoded as the empty prompt and flagged invalid so the loss masks its
    column (or, with `released_placeholder`, kept as a real negative like the released code)."""

    def __init__(self, tokenizer: PreTrainedTokenizerBase, image_policy: ImagePolicy,
                 released_placeholder: bool = False) -> None:
        self.encoder = SequenceEncoder(tokenizer, image_policy)
        self.released_placeholder = released_placeholder

    def __call__(self, samples: Sequence[PairSample]) -> dict[str, Any]:
        q_texts, p_texts, n_texts, valid = [], [], [], []
        for s in samples:
            for field_name in ("qry_text", "pos_text", "neg_text"):
                value = getattr(s, field_name)
                if value is not None:
                    check_user_text(value, s.key, field_name)
            q_user = single_turn_user_text(s.qry_text, s.qry_image is not None)
            p_user = single_turn_user_text(s.pos_text, s.pos_image is not None)
            q_texts.append(finetune_template(q_user, s.masked_pos))
            p_texts.append(finetune_template(p_user, s.masked_qry))
            has_neg = s.neg_text is not None or s.neg_image is not None
            n_user = single_turn_user_text(s.neg_text or "", s.neg_image is not None) if has_neg else EMPTY_NEGATIVE
            n_texts.append(base_template(n_user))
            valid.append(has_neg or self.released_placeholder)
        return {
            "query": self.encoder(q_texts, [s.qry_image for s in samples]),
            "target": self.encoder(p_texts, [s.pos_image for s in samples]),
            "negative": self.encoder(n_texts, [s.neg_image if s.neg_text is not None or s.neg_image is not None
                                               else None for s in samples]),
            "negative_valid": torch.tensor(valid, dtype=torch.bool),
            "keys": [s.key for s in samples],
        }
