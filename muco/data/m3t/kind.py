"""M3T pretraining records as a record kind (``data.records``): K turns drawn per sample, mined negatives."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, dataclass
from typing import Any

from transformers import PreTrainedTokenizerBase

from muco.data.kinds import RecordKind
from muco.data.length_buckets import text_tokens, visual_tokens
from muco.data.m3t.collate import PretrainCollator, PretrainSample
from muco.data.m3t.decode import BatchTurnOrder, M3TDecoder
from muco.data.m3t.negatives import NegativeSampler, NegativesConfig, load_negatives
from muco.data.m3t.turns import TURN_ORDERS
from muco.data.records import MAX_SEQUENCE_CHARS, MAX_TEXT_CHARS
from muco.data.shards import ShardSet
from muco.inputs.image_policy import ImagePolicy


class M3TRecords(RecordKind):
    """Multi-turn records about one image (docs/method.md §2, §5).

    Args:
        turns_per_sample: turns drawn per sample into one query and one target sequence (K; 7 in the recipe).
        turns_per_record: the turn count of every record (others are skipped, counted); default: the
            manifest's ``turns``; without either, records need only ``turns_per_sample`` turns.
        turn_order: "sample" (a random order per sample, default), "batch" (one random order per batch) or
            "stored" (never shuffled).
        max_text_chars / max_sequence_chars: samples whose drawn texts exceed them (one text; the texts of the
            query or the target sequence) are skipped and counted, bounding step time and memory (0: none).
        negatives: mined hard negatives for training, ``{sidecar: <muco mine output dir>, band: [lo, hi],
            per_turn: n}`` (ranks inclusive, 1 = hardest; default band [1, 10], one per turn); None: in-batch
            only. Validation batches never carry them.
    """

    label = "M3T pretraining records"
    hint = ("train them with data.records: muco.data.m3t.kind.M3TRecords and model.objective: "
            "muco.objectives.PretrainObjective (configs/m3t_2b.yaml)")
    convert_hint = "convert M3T records with `muco data convert`"

    def __init__(
        self,
        turns_per_sample: int = 7,
        turns_per_record: int | None = None,
        turn_order: str = "sample",
        max_text_chars: int = MAX_TEXT_CHARS,
        max_sequence_chars: int = MAX_SEQUENCE_CHARS,
        negatives: NegativesConfig | None = None,
    ) -> None:
        self.turns_per_sample, self.turns_per_record = turns_per_sample, turns_per_record
        self.turn_order = turn_order
        self.max_text_chars, self.max_sequence_chars = max_text_chars, max_sequence_chars
        self.negatives = NegativesConfig.coerce(negatives)
        self.sampler: NegativeSampler | None = None  # loaded once, by load()

    def validate(self) -> None:
        if self.turn_order not in TURN_ORDERS:
            raise ValueError(f"data.records.turn_order={self.turn_order!r}; choose one of {TURN_ORDERS}")
        if self.turns_per_sample < 1:
            raise ValueError(f"data.records.turns_per_sample must be >= 1, got {self.turns_per_sample}")

    def matches(self, record: Mapping[str, Any]) -> bool:
        return "turns" in record

    def check_source(self, shards: ShardSet, name: str) -> int | None:
        """The turn count every record of this source must have (a record with another is skipped): the
        ``turns_per_record`` setting, else the manifest's ``turns``; None without either (records then need
        only ``turns_per_sample`` turns)."""
        stated = self.turns_per_record
        if stated is not None and shards.turns is not None and stated != shards.turns:
            raise ValueError(f"data.records.turns_per_record={stated} but the manifest of {name} says its records "
                             f"have {shards.turns} turns; drop data.records.turns_per_record or point {name} at the "
                             "right shards")
        turns = stated if stated is not None else shards.turns
        if turns is not None and self.turns_per_sample > turns:
            raise ValueError(f"data.records.turns_per_sample={self.turns_per_sample} but the records of {name} have "
                             f"{turns} turns; set data.records.turns_per_sample <= {turns}")
        return turns

    def load(self, train_samples: int | None) -> None:
        if self.negatives is not None and self.sampler is None:
            self.sampler = load_negatives(self.negatives, train_samples)

    def use_negatives(self, negatives: NegativesConfig | Mapping[str, Any] | None, train_samples: int | None) -> None:
        """Train with other mined negatives from the next decoder on (None: in-batch only): the rounds inside
        ``muco fit`` swap them between rounds."""
        self.negatives, self.sampler = NegativesConfig.coerce(negatives), None
        self.load(train_samples)

    def decoder(self, policy: ImagePolicy, seed: int, train: bool, source_info: Any) -> M3TDecoder:
        # validation draws a per-sample order and never carries negatives
        return M3TDecoder(policy, self.turns_per_sample, seed=seed, expected_turns=source_info,
                          turn_order=self.turn_order if train else "sample", max_text_chars=self.max_text_chars,
                          max_sequence_chars=self.max_sequence_chars, negatives=self.sampler if train else None)

    def arranger(self, train: bool) -> BatchTurnOrder | None:
        return BatchTurnOrder(self.turns_per_sample) if train and self.turn_order == "batch" else None

    def collator(self, tokenizer: PreTrainedTokenizerBase, policy: ImagePolicy) -> PretrainCollator:
        return PretrainCollator(tokenizer, policy)

    def length_key(self, policy: ImagePolicy) -> M3TLength:
        return M3TLength(policy)

    def init_args(self) -> dict[str, Any]:
        negatives = None if self.negatives is None else {**asdict(self.negatives), "band": list(self.negatives.band)}
        return {"turns_per_sample": self.turns_per_sample, "turns_per_record": self.turns_per_record,
                "turn_order": self.turn_order, "max_text_chars": self.max_text_chars,
                "max_sequence_chars": self.max_sequence_chars, "negatives": negatives}

    def describe(self) -> str:
        text = f"M3T, {self.turns_per_sample} turns per sample"
        if self.negatives is not None:
            text += (f", mined negatives ranks {self.negatives.band[0]}-{self.negatives.band[1]}, "
                     f"{self.negatives.per_turn} per turn")
        return text


@dataclass(frozen=True)
class M3TLength:
    """A drawn sample's length for ``data.length_bucketing``: the estimated tokens of the longer of its two
    sequences, the query (the image's visual tokens and the drawn queries) or the target (the drawn targets).
    The query holds the image, so it is mostly the longer one and carries most of the padding; at M3T shapes
    ordering by it pads less than ordering by the sum of both (``benchmarks/bench_padding.py``: 0.973 against
    0.964 of positions real with windows of 8 batches of 32)."""

    policy: ImagePolicy

    def __call__(self, sample: PretrainSample) -> int:
        query = visual_tokens(sample.image, self.policy) + text_tokens(sample.queries)
        return max(query, text_tokens(sample.targets))
