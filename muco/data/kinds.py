"""The record-kind contract: everything the DataModule and the stream need to know about what a record holds.

A kind is a small object configured from YAML (``data.records``): it validates its settings, recognises its
records, checks them against a source's manifest, and builds the stream's per-sample decoder, per-batch arranger
and collator. The DataModule, the stream and the resume bookkeeping are the same for every kind. Kinds:
:class:`muco.data.m3t.kind.M3TRecords` (pretraining) and :class:`muco.data.pairs.kind.PairRecords`
(fine-tuning). A new kind implements this class in its own package under ``muco/data/``.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from transformers import PreTrainedTokenizerBase

from muco.components import Component, build_component
from muco.data.length_buckets import LengthKey
from muco.data.shards import ShardSet
from muco.data.stream import Arranger, Collator, Decoder
from muco.inputs.image_policy import ImagePolicy


class RecordKind(Component):
    """Base class of record kinds; subclasses override every method that raises here (and ``init_args``)."""

    label = "records"  # what the records are, for messages ("M3T pretraining records")
    hint = ""  # how to train records of this kind (a pointer to the config to use)
    convert_hint = ""  # how to write shards of this kind

    def validate(self) -> None:
        """Check the kind's own settings (called in the DataModule's setup, before anything is read)."""

    def matches(self, record: Mapping[str, Any]) -> bool:
        """Whether a stored record (parsed JSON) is of this kind."""
        raise NotImplementedError

    def check_source(self, shards: ShardSet, name: str) -> Any:
        """Check the settings against one source (``name``: the config key, for messages); returns what the
        decoder needs to know about it (e.g. the turn count every record has), or None."""
        return None

    def load(self, train_samples: int | None) -> None:
        """Read what training needs once (e.g. a mined-negatives sidecar); ``train_samples`` from manifests."""

    def decoder(self, policy: ImagePolicy, seed: int, train: bool, source_info: Any) -> Decoder:
        raise NotImplementedError

    def arranger(self, train: bool) -> Arranger | None:
        return None

    def collator(self, tokenizer: PreTrainedTokenizerBase, policy: ImagePolicy) -> Collator:
        raise NotImplementedError

    def length_key(self, policy: ImagePolicy) -> LengthKey | None:
        """A decoded sample's estimated token count, for ``data.length_bucketing`` (None: the kind has none)."""
        return None

    def describe(self) -> str:
        return self.label


def build_record_kind(value: RecordKind | Mapping[str, Any]) -> RecordKind:
    """A record kind from an instance or its ``spec()`` (YAML / saved hyper-parameters)."""
    return build_component(value, RecordKind, "data.records",
                           "muco.data.m3t.kind.M3TRecords or muco.data.pairs.kind.PairRecords")
