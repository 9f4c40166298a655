"""M3T collation: drawn multi-turn samples -> the query, target (and mined-negative) sequences of a batch."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from PIL import Image
from transformers import PreTrainedTokenizerBase

from muco.inputs.image_policy import ImagePolicy
from muco.inputs.sequence import BadSampleError, SequenceEncoder, check_user_text, text_id
from muco.inputs.templates import pretrain_query_turns, pretrain_template


@dataclass
class PretrainSample:
    """One image with its K drawn turns, already in the sample's (shared) turn order.

    ``turns``: stored index of each drawn turn (same order). ``negatives``: mined negatives, ``per_turn`` lists
    of K texts in the same turn order, ``None`` where a turn has no negative for that draw (training with
    ``data.records.negatives`` only; see :mod:`muco.data.m3t.negatives`).
    """

    key: str
    image: Image.Image | None
    queries: list[str]
    targets: list[str]
    turns: list[int] | None = None
    negatives: list[list[str | None]] | None = None


# the user text of a missing negative's turn: it still yields its <|emb|> (masked by the loss)
MISSING_NEGATIVE = ""


class PretrainCollator:
    """K-turn pretraining batches: one query sequence (image in turn 1) and one target sequence per sample.

    When the samples carry mined negatives (all of them, the same ``per_turn``), the batch also holds, for
    each sample and each of its ``per_turn`` draws, ONE K-turn negative sequence ``PRETRAIN(neg_1..neg_K)``
    (text only, the targets' template), so one forward yields the K negatives in turn order:

    - ``negative``: encoded like ``target``; sequences sample-major, then draw;
    - ``negative_num_turns`` [B*per_turn]: ``<|emb|>`` count of each negative sequence;
    - ``negative_valid`` bool [B*per_turn*K], ``negative_text_id`` [B*per_turn*K]: per pooled negative
      (sample, draw, turn order); a missing negative is a placeholder turn with ``valid=False`` and a negative
      text id that matches no text.

    Every sample contributes ``per_turn*K`` negative rows, so ranks with equal batches gather equal counts.
    """

    def __init__(self, tokenizer: PreTrainedTokenizerBase, image_policy: ImagePolicy) -> None:
        self.encoder = SequenceEncoder(tokenizer, image_policy)

    def __call__(self, samples: Sequence[PretrainSample]) -> dict[str, Any]:
        q_texts, t_texts, images = [], [], []
        for s in samples:
            if len(s.queries) != len(s.targets) or not s.queries:
                raise BadSampleError(f"sample {s.key!r}: {len(s.queries)} queries vs {len(s.targets)} targets")
            for k, (q, t) in enumerate(zip(s.queries, s.targets)):
                check_user_text(q, s.key, f"turn {k} query")
                check_user_text(t, s.key, f"turn {k} target")
            q_texts.append(pretrain_template(pretrain_query_turns(s.queries, s.image is not None)))
            t_texts.append(pretrain_template(s.targets))
            images.append(s.image)
        batch = {
            "query": self.encoder(q_texts, images),
            "target": self.encoder(t_texts, [None] * len(samples)),
            "num_turns": torch.tensor([len(s.queries) for s in samples], dtype=torch.long),
            # sample-major, turn order: row k of the pooled targets
            "target_text_id": torch.tensor([text_id(t) for s in samples for t in s.targets], dtype=torch.long),
            "keys": [s.key for s in samples],
        }
        if any(s.negatives is not None for s in samples):
            batch.update(self.negatives(samples))
        return batch

    def negatives(self, samples: Sequence[PretrainSample]) -> dict[str, Any]:
        """The packed negative sequences of samples that all carry ``negatives`` (see the class docstring)."""
        per_turn = None
        texts, num_turns, valid, ids = [], [], [], []
        for s in samples:
            if s.negatives is None:
                raise BadSampleError(f"sample {s.key!r} has no negatives but other samples of its batch have")
            if per_turn is None:
                per_turn = len(s.negatives)
            if len(s.negatives) != per_turn or per_turn == 0:
                raise BadSampleError(f"sample {s.key!r}: {len(s.negatives)} negative draws, expected {per_turn}")
            for j, draw in enumerate(s.negatives):
                if len(draw) != len(s.queries):
                    raise BadSampleError(f"sample {s.key!r}: draw {j} has {len(draw)} negatives for "
                                         f"{len(s.queries)} turns")
                for k, neg in enumerate(draw):
                    if neg is not None:
                        check_user_text(neg, s.key, f"turn {k} negative {j}")
                    valid.append(neg is not None)
                    # a missing negative's id is negative, so it never equals a text id (those are >= 0)
                    ids.append(text_id(neg) if neg is not None else -1 - len(ids))
                texts.append(pretrain_template([MISSING_NEGATIVE if n is None else n for n in draw]))
                num_turns.append(len(draw))
        return {
            "negative": self.encoder(texts, [None] * len(texts)),
            "negative_num_turns": torch.tensor(num_turns, dtype=torch.long),
            "negative_valid": torch.tensor(valid, dtype=torch.bool),
            "negative_text_id": torch.tensor(ids, dtype=torch.long),
        }
