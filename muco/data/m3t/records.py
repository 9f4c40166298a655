"""The typed M3T record (docs/method.md §2.3): validation and the JSON form stored in shards.

A shard sample is ``{key}.<image ext>`` + ``{key}.json`` where the JSON holds
``{"turns": [{"task", "queries", "target"}, ...], "caption": str | null}``, plus
``"negatives": [{"text", "image"?}]`` when the record has hard negatives.
Queries are stored without the released ``<|image_1|>`` marker: the templates place the image themselves.
Validation is strict and every error names the record key and the offending field, because a bad record found
at conversion time costs a line in a rejects file, while one found during training costs a skipped sample.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from muco.data.records import IMAGE_MARKER, KEY_RE, RecordError, json_object, strip_image_marker
from muco.inputs.templates import find_reserved

JSON_FIELDS = ("turns", "caption", "negatives")
# task of each turn in the released 7-turn order (docs/method.md §2.1)
M3T_TASKS = ("cls", "vqa_global", "vqa_global", "vqa_local", "vqa_local", "vqa_creative", "ret")
@dataclass
class Turn:
    task: str
    queries: list[str]  # candidate phrasings; one is drawn uniformly per sample
    target: str


@dataclass
class Negative:
    text: str
    image: str | None = None  # a reference (path relative to an image root), not embedded in shards


@dataclass
class M3TRecord:
    key: str
    image: bytes | None
    turns: list[Turn]
    caption: str | None = None
    negatives: list[Negative] | None = field(default=None)

    def validate(self, expected_turns: int | None = None) -> M3TRecord:
        """Raise :class:`RecordError` on the first problem; return self so calls chain."""
        key = self.key
        if not isinstance(key, str) or not KEY_RE.fullmatch(key):
            raise RecordError(key, "key", "must match [A-Za-z0-9][A-Za-z0-9_-]* (no '.', '/', spaces)", "key")
        if self.image is not None and not isinstance(self.image, (bytes, bytearray)):
            raise RecordError(key, "image", f"must be bytes or None, got {type(self.image).__name__}")
        if not isinstance(self.turns, list) or not self.turns:
            raise RecordError(key, "turns", "must be a non-empty list", "turn_count")
        if expected_turns is not None and len(self.turns) != expected_turns:
            raise RecordError(key, "turns", f"has {len(self.turns)} turns, expected {expected_turns}",
                              "turn_count")
        for i, t in enumerate(self.turns):
            if not isinstance(t, Turn):
                raise RecordError(key, f"turns[{i}]", f"must be a Turn, got {type(t).__name__}")
            _text(key, f"turns[{i}].task", t.task)
            if not isinstance(t.queries, list):
                raise RecordError(key, f"turns[{i}].queries",
                                  f"must be a list, got {type(t.queries).__name__}")
            if not t.queries:
                raise RecordError(key, f"turns[{i}].queries", "is an empty candidate list", "empty")
            for j, q in enumerate(t.queries):
                _text(key, f"turns[{i}].queries[{j}]", q)
            _text(key, f"turns[{i}].target", t.target)
        if self.caption is not None:
            _text(key, "caption", self.caption)
        if self.negatives is not None:
            if not isinstance(self.negatives, list):
                raise RecordError(key, "negatives", f"must be a list, got {type(self.negatives).__name__}")
            for i, n in enumerate(self.negatives):
                if not isinstance(n, Negative):
                    raise RecordError(key, f"negatives[{i}]", f"must be a Negative, got {type(n).__name__}")
                _text(key, f"negatives[{i}].text", n.text)
                if n.image is not None:
                    _text(key, f"negatives[{i}].image", n.image)
        return self

    def to_json(self) -> dict[str, Any]:
        """The ``{key}.json`` content (image and key live outside it)."""
        out: dict[str, Any] = {
            "turns": [{"task": t.task, "queries": list(t.queries), "target": t.target} for t in self.turns],
            "caption": self.caption,
        }
        if self.negatives is not None:
            out["negatives"] = [
                {"text": n.text} if n.image is None else {"text": n.text, "image": n.image}
                for n in self.negatives
            ]
        return out

    def to_json_bytes(self) -> bytes:
        return json.dumps(self.to_json(), ensure_ascii=False, separators=(",", ":")).encode("utf-8")

    @classmethod
    def from_json(
        cls, key: str, obj: Mapping[str, Any] | bytes | str, image: bytes | None = None,
        expected_turns: int | None = None,
    ) -> M3TRecord:
        """Parse and validate a ``{key}.json`` payload (dict, or its encoded text)."""
        obj = json_object(key, obj)
        unknown = sorted(set(obj) - set(JSON_FIELDS))
        if unknown:
            raise RecordError(key, "json", f"has unknown fields {unknown}; allowed: {list(JSON_FIELDS)}")
        if "turns" not in obj:
            raise RecordError(key, "turns", "is missing", "turn_count")
        turns_raw = obj["turns"]
        if not isinstance(turns_raw, list):
            raise RecordError(key, "turns", f"must be a list, got {type(turns_raw).__name__}")
        turns = [_turn(key, i, t) for i, t in enumerate(turns_raw)]
        negatives = None
        if obj.get("negatives") is not None:
            negs = obj["negatives"]
            if not isinstance(negs, list):
                raise RecordError(key, "negatives", f"must be a list, got {type(negs).__name__}")
            negatives = [_negative(key, i, n) for i, n in enumerate(negs)]
        rec = cls(key=key, image=image, turns=turns, caption=obj.get("caption"), negatives=negatives)
        return rec.validate(expected_turns)


def _text(key: str, name: str, value: Any) -> None:
    if not isinstance(value, str):
        raise RecordError(key, name, f"must be a string, got {type(value).__name__}")
    if not value.strip():
        raise RecordError(key, name, "is empty", "empty")
    bad = find_reserved(value)
    if bad is not None:
        raise RecordError(key, name, f"contains the reserved string {bad!r}", "reserved")
    if IMAGE_MARKER in value:
        # a marker left in stored text would reach the tokenizer as literal characters
        raise RecordError(key, name, f"contains the image marker {IMAGE_MARKER!r}; strip it", "marker")


def _turn(key: str, i: int, t: Any) -> Turn:
    if not isinstance(t, Mapping):
        raise RecordError(key, f"turns[{i}]", f"must be an object, got {type(t).__name__}")
    missing = [f for f in ("task", "queries", "target") if f not in t]
    if missing:
        raise RecordError(key, f"turns[{i}]", f"is missing {missing}")
    extra = sorted(set(t) - {"task", "queries", "target"})
    if extra:
        raise RecordError(key, f"turns[{i}]", f"has unknown fields {extra}")
    queries = t["queries"]
    if not isinstance(queries, list):
        raise RecordError(key, f"turns[{i}].queries", f"must be a list, got {type(queries).__name__}")
    return Turn(task=t["task"], queries=list(queries), target=t["target"])


def _negative(key: str, i: int, n: Any) -> Negative:
    if not isinstance(n, Mapping) or "text" not in n or set(n) - {"text", "image"}:
        raise RecordError(key, f"negatives[{i}]", "must be an object {text, image?}")
    return Negative(text=n["text"], image=n.get("image"))


def turns_from_lists(
    key: str, queries: Sequence[Any], targets: Sequence[Any], tasks: Sequence[str]
) -> list[Turn]:
    """Build turns from parallel per-turn columns (the released parquet layout), stripping image markers.

    A bare string where a candidate list is expected is taken as a single candidate (the released dtype is
    unverified); anything else that is not a list of strings is a type error.
    """
    if not isinstance(queries, (list, tuple)) or not isinstance(targets, (list, tuple)):
        raise RecordError(key, "qry/pos_text", "must be per-turn lists")
    if len(queries) != len(targets):
        raise RecordError(key, "qry/pos_text", f"have {len(queries)} vs {len(targets)} turns", "turn_count")
    turns = []
    for i, (cands, target) in enumerate(zip(queries, targets)):
        if isinstance(cands, str):
            cands = [cands]
        if not isinstance(cands, (list, tuple)):
            raise RecordError(key, f"qry[{i}]", f"must be a list of strings, got {type(cands).__name__}")
        for j, c in enumerate(cands):
            if not isinstance(c, str):
                raise RecordError(key, f"qry[{i}][{j}]", f"must be a string, got {type(c).__name__}")
        task = tasks[i] if i < len(tasks) else f"turn{i}"
        turns.append(Turn(task=task, queries=[strip_image_marker(c) for c in cands], target=target))
    return turns
