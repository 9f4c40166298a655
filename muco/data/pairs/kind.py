"""Fine-tuning pairs as a record kind (``data.records``): masked counterparts and one drawn hard negative."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from transformers import PreTrainedTokenizerBase

from muco.data.kinds import RecordKind
from muco.data.length_buckets import text_tokens, visual_tokens
from muco.data.pairs.collate import FinetuneCollator, PairSample
from muco.data.pairs.decode import PairDecoder
from muco.data.pairs.masking import MaskingConfig
from muco.inputs.image_policy import ImagePolicy


class PairRecords(RecordKind):
    """Query/positive pairs with hard negatives (docs/method.md §8). ``batch_size`` counts pairs.

    Masking of the reconstruction counterparts (released defaults): each counterpart becomes a single
    ``<|mask|>`` with probability ``full_mask_prob``, else each word is masked with probability ``mask_ratio``
    and runs of masks collapse into one (``collapse_mask_runs``). Paper-style uniform masking:
    ``full_mask_prob=0``, ``collapse_mask_runs=false``.
    """

    label = "fine-tuning pairs"
    hint = ("train them with data.records: muco.data.pairs.kind.PairRecords and model.objective: "
            "muco.objectives.FinetuneObjective (configs/finetune_2b.yaml)")
    convert_hint = "convert pairs with `muco data convert --kind pairs`"

    def __init__(self, mask_ratio: float = 0.5, full_mask_prob: float = 0.5, collapse_mask_runs: bool = True) -> None:
        self.masking = MaskingConfig(ratio=mask_ratio, full_mask_prob=full_mask_prob,
                                     collapse_runs=collapse_mask_runs)

    def matches(self, record: Mapping[str, Any]) -> bool:
        return "turns" not in record and {"query", "positive"} <= set(record)

    def decoder(self, policy: ImagePolicy, seed: int, train: bool, source_info: Any) -> PairDecoder:
        return PairDecoder(policy, seed=seed, masking=self.masking)

    def collator(self, tokenizer: PreTrainedTokenizerBase, policy: ImagePolicy) -> FinetuneCollator:
        return FinetuneCollator(tokenizer, policy)

    def length_key(self, policy: ImagePolicy) -> PairLength:
        return PairLength(policy)

    def init_args(self) -> dict[str, Any]:
        m = self.masking
        return {"mask_ratio": m.ratio, "full_mask_prob": m.full_mask_prob, "collapse_mask_runs": m.collapse_runs}

    def describe(self) -> str:
        return "pairs"


@dataclass(frozen=True)
class PairLength:
    """A decoded pair's length for ``data.length_bucketing``: the estimated tokens of the longest of its
    sequences (query: its image, text and the masked positive; target: likewise; the negative), as
    :class:`~muco.data.m3t.kind.M3TLength` orders M3T samples by their longer sequence."""

    policy: ImagePolicy

    def __call__(self, s: PairSample) -> int:
        def tokens(image: Any, *texts: str | None) -> int:
            return visual_tokens(image, self.policy) + text_tokens(texts)

        return max(tokens(s.qry_image, s.qry_text, s.masked_pos), tokens(s.pos_image, s.pos_text, s.masked_qry),
                   tokens(s.neg_image, s.neg_text))
