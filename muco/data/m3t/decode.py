"""M3T decoding, the stream's per-sample stage: raw tar members -> a validated record with its turns (and mined
negatives) drawn for this epoch (docs/method.md §5); plus the per-batch turn order of ``turn_order="batch"``."""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Any

from muco.data.images import load_image
from muco.data.m3t.collate import PretrainSample
from muco.data.m3t.negatives import NegativeSampler
from muco.data.m3t.records import M3TRecord
from muco.data.m3t.turns import apply_order, draw_turns_indexed, permute_turns
from muco.data.records import MAX_SEQUENCE_CHARS, MAX_TEXT_CHARS
from muco.data.seeds import sample_rng
from muco.inputs.image_policy import ImagePolicy
from muco.inputs.sequence import BadSampleError

IMAGE_EXTS = ("jpg", "jpeg", "png", "webp")


def record_and_image(raw: dict[str, Any]) -> tuple[M3TRecord, bytes]:
    """A raw sample's validated record (types, empty strings, reserved tokens) and its undecoded image."""
    ext = next((e for e in IMAGE_EXTS if e in raw), None)
    if "json" not in raw or ext is None:
        raise BadSampleError("missing member .json" if "json" not in raw else
                             f"missing image member (one of {IMAGE_EXTS})")
    return M3TRecord.from_json(raw["__key__"], raw["json"]), raw[ext]


@dataclass
class M3TDecoder:
    """``decoder(raw, epoch)`` -> a :class:`PretrainSample`; raises on any problem (the stream skips the sample).

    ``turn_order``: "sample" draws a turn order per sample, "batch" keeps the stored order here (the batch's
    shared order comes from :class:`BatchTurnOrder`), "stored" never shuffles."""

    image_policy: ImagePolicy
    turns_per_sample: int
    seed: int = 0
    expected_turns: int | None = None  # records with another turn count are bad samples
    turn_order: str = "sample"
    max_text_chars: int = MAX_TEXT_CHARS  # length bounds on the drawn texts (0: none)
    max_sequence_chars: int = MAX_SEQUENCE_CHARS
    negatives: NegativeSampler | None = None  # mined negatives drawn per sample

    def __call__(self, raw: dict[str, Any], epoch: int) -> PretrainSample:
        key = raw["__key__"]
        record, image_bytes = record_and_image(raw)
        n = len(record.turns)
        if self.expected_turns is not None and n != self.expected_turns:
            raise BadSampleError(f"has {n} turns, expected {self.expected_turns} (the data source's turn count)")
        if n < self.turns_per_sample:
            raise BadSampleError(f"has {n} turns, fewer than data.records.turns_per_sample={self.turns_per_sample}")
        image = load_image(image_bytes, self.image_policy)
        queries, targets, turns = self.draw(record, epoch)
        self.check_lengths(queries, targets)
        # the negatives' own RNG: the turn draws above do not change when negatives are on
        negs = None if self.negatives is None else self.negatives.draw_seeded(key, turns, self.seed, epoch)
        return PretrainSample(key=key, image=image, queries=queries, targets=targets, turns=turns, negatives=negs)

    def draw(self, record: M3TRecord, epoch: int) -> tuple[list[str], list[str], list[int]]:
        """The turns drawn for ``record`` in data epoch ``epoch``: (queries, targets, stored turn indices) in drawn
        order, one candidate query per turn; stored order unless ``turn_order="sample"`` (``"batch"`` permutes
        whole batches later). A pure function of (seed, epoch, key): mining calls it to embed exactly what
        training draws (``muco mine --query-draws train``, :mod:`muco.mine.embed`)."""
        return draw_turns_indexed(record.turns, self.turns_per_sample, sample_rng(self.seed, epoch, record.key),
                                  shuffle=self.turn_order == "sample")

    def check_lengths(self, queries: list[str], targets: list[str]) -> None:
        """A sample whose drawn texts exceed the configured bounds is skipped (a 4,000-character caption would
        widen its whole batch tenfold): each text, and the texts of the query and of the target sequence."""
        if self.max_text_chars:
            longest = max(map(len, queries + targets))
            if longest > self.max_text_chars:
                raise BadSampleError(f"a text of {longest:,} characters, over "
                                     f"data.records.max_text_chars={self.max_text_chars:,}")
        if self.max_sequence_chars:
            for side, texts in (("query", queries), ("target", targets)):
                total = sum(map(len, texts))
                if total > self.max_sequence_chars:
                    raise BadSampleError(f"{side} sequence of {total:,} text characters, over "
                                         f"data.records.max_sequence_chars={self.max_sequence_chars:,}")


@dataclass
class BatchTurnOrder:
    """``turn_order="batch"``: one random turn order shared by all samples of a batch, so turn positions carry
    no sample identity (the demo's label-derived texts would otherwise let the model match query and target by
    turn order alone). The stream calls it with a per-batch seeded RNG."""

    turns_per_sample: int

    def __call__(self, samples: list[PretrainSample], rng: random.Random) -> list[PretrainSample]:
        k = self.turns_per_sample
        order = rng.sample(range(k), k)
        for s in samples:
            s.queries, s.targets = permute_turns(s.queries, s.targets, order)
            if s.turns is not None:
                s.turns = apply_order(s.turns, order)
            if s.negatives is not None:
                s.negatives = [apply_order(draw, order) for draw in s.negatives]
        return samples
