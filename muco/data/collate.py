"""Collation: templated texts (+ at most one image each) -> Qwen2-VL model inputs.

Tokenisation runs on the texts with a single ``<|image_pad|>``; the pad is expanded to the image's visual-token
count on the id lists afterwards, which is far cheaper than tokenising hundreds of placeholder strings.
Batches are right-padded and never truncated: truncation would lose ``<|emb|>`` slots.

Images leave as uint8 patches (``muco.data.image_policy.patchify``); the model side (``Embedder``) normalises
them on the device into the stock float format.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from PIL import Image
from transformers import PreTrainedTokenizerBase

from muco.data.image_policy import MERGE, ImagePolicy, patchify
from muco.data.templates import IMAGE_PAD, find_reserved, pretrain_query_turns, pretrain_template
from muco.model.tokenizer import SpecialTokenIds


def text_id(text: str) -> int:
    """A stable 63-bit id of a text (equal texts, equal ids, in every process), for same-text masking."""
    return int.from_bytes(hashlib.blake2b(text.encode("utf-8"), digest_size=8).digest(), "little") >> 1


class BadSampleError(ValueError):
    """A sample that cannot be turned into a sequence; the message names the sample."""


def check_user_text(text: str, key: str, field: str) -> None:
    """Refuse data texts that hold a special-token string (it would misalign pooling)."""
    bad = find_reserved(text)
    if bad is not None:
        raise BadSampleError(f"sample {key!r}: {field} contains the reserved string {bad!r}")


class SequenceEncoder:
    """Encodes fully templated texts, each with zero or one image, into one padded batch."""

    def __init__(self, tokenizer: PreTrainedTokenizerBase, image_policy: ImagePolicy) -> None:
        self.tokenizer = tokenizer
        self.policy = image_policy
        self.ids = SpecialTokenIds.from_tokenizer(tokenizer)
        self.merge = MERGE

    def __call__(self, texts: Sequence[str], images: Sequence[Image.Image | None]) -> dict[str, torch.Tensor]:
        if len(texts) != len(images):
            raise ValueError(f"{len(texts)} texts but {len(images)} images")
        present = [im for im in images if im is not None]
        out: dict[str, Any] = {}
        visual_tokens: list[int] = []
        if present:
            # prepare keeps images the stream already brought to the final size: one resize in all
            pixel_values, grid = patchify([self.policy.prepare(im) for im in present])
            out["pixel_values"] = pixel_values  # uint8 [patches, 3*14*14]
            out["image_grid_thw"] = grid
            visual_tokens = (grid.prod(-1) // self.merge**2).tolist()

        encoded = self.tokenizer(list(texts), add_special_tokens=False)["input_ids"]
        pad_id, img_id = self.ids.pad, self.ids.image_pad
        rows: list[list[int]] = []
        it = iter(visual_tokens)
        for text_ids, image in zip(encoded, images):
            n_pad = text_ids.count(img_id)
            if n_pad != (1 if image is not None else 0):
                raise ValueError(
                    f"a sequence has {n_pad} {IMAGE_PAD} placeholders but {'one image' if image else 'no image'}"
                )
            if image is not None:
                at = text_ids.index(img_id)
                text_ids = text_ids[:at] + [img_id] * next(it) + text_ids[at + 1 :]
            rows.append(text_ids)

        width = max(len(r) for r in rows)
        input_ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
        attention_mask = torch.zeros((len(rows), width), dtype=torch.long)
        for i, r in enumerate(rows):
            input_ids[i, : len(r)] = torch.tensor(r, dtype=torch.long)
            attention_mask[i, : len(r)] = 1
        out["input_ids"] = input_ids
        out["attention_mask"] = attention_mask
        out["mm_token_type_ids"] = (input_ids == img_id).int()
        return out


@dataclass
class PretrainSample:
    """One image with its K drawn turns, already in the sample's (shared) turn order.

    ``turns``: stored index of each drawn turn (same order). ``negatives``: mined negatives, ``per_turn`` lists
    of K texts in the same turn order, ``None`` where a turn has no negative for that draw (training with
    ``data.negatives`` only; see :mod:`muco.data.negatives`).
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
