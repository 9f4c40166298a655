"""The typed fine-tuning pair record (docs/method.md §2.3, §8): validation and the JSON form stored in shards.

A shard sample is ``{key}.json`` plus one member per image, named in the JSON::

    {"query":     {"text": str, "image": "qry.jpg" | null, "caption": str | null},
     "positive":  {"text": str, "image": "pos.png" | null, "caption": str | null},
     "negatives": [{"text": str, "image": "neg0.jpg" | null}, ...]}

At conversion time ``image`` holds a path relative to the image root instead; the converter loads it and
rewrites it to the member name. Texts are stored without the released ``<|image_1|>`` marker. An image-bearing
query or positive needs its caption: it replaces the image in the masked counterpart shown to the other side
(§8.2). Negatives are encoded single-turn, so they need none. Errors name the record key and the field.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from muco.data.records import IMAGE_MARKER, KEY_RE, RecordError, json_object
from muco.inputs.templates import find_reserved

PAIR_FIELDS = ("query", "positive", "negatives")
SIDE_FIELDS = ("text", "image", "caption")
# shard member names of the images: <role>.<ext>, role qry | pos | neg<i>
MEMBER_RE = re.compile(r"(qry|pos|neg[0-9]+)\.(jpg|jpeg|png|webp)")


@dataclass
class Side:
    """One side of a pair (or a hard negative, whose ``caption`` stays None)."""

    text: str
    image: str | None = None  # conversion: path under the image root; shards: member name ("qry.jpg")
    caption: str | None = None

    def to_json(self, with_caption: bool = True) -> dict[str, Any]:
        out: dict[str, Any] = {"text": self.text, "image": self.image}
        if with_caption:
            out["caption"] = self.caption
        return out


@dataclass
class PairRecord:
    key: str
    query: Side
    positive: Side
    negatives: list[Side] = field(default_factory=list)

    def validate(self, stored: bool = False) -> PairRecord:
        """Raise :class:`RecordError` on the first problem; with ``stored`` image fields must be member names."""
        key = self.key
        if not isinstance(key, str) or not KEY_RE.fullmatch(key):
            raise RecordError(key, "key", "must match [A-Za-z0-9][A-Za-z0-9_-]* (no '.', '/', spaces)", "key")
        for name in ("query", "positive"):
            side = getattr(self, name)
            if not isinstance(side, Side):
                raise RecordError(key, name, f"must be a Side, got {type(side).__name__}")
            _side(key, name, side, stored)
            if side.image is not None and side.caption is None:
                raise RecordError(
                    key, f"{name}.caption",
                    "is missing: an image-bearing side needs a caption, which replaces its image in the masked "
                    "counterpart shown to the other side (docs/method.md §8.2); caption the image offline "
                    "(qry_sentence / pos_sentence) or drop the record", "missing_caption")
        if not isinstance(self.negatives, list):
            raise RecordError(key, "negatives", f"must be a list, got {type(self.negatives).__name__}")
        for i, n in enumerate(self.negatives):
            if not isinstance(n, Side):
                raise RecordError(key, f"negatives[{i}]", f"must be a Side, got {type(n).__name__}")
            if n.caption is not None:
                raise RecordError(key, f"negatives[{i}].caption", "is not used: negatives are encoded single-turn")
            _side(key, f"negatives[{i}]", n, stored)
        return self

    def to_json(self) -> dict[str, Any]:
        """The ``{key}.json`` content."""
        return {"query": self.query.to_json(), "positive": self.positive.to_json(),
                "negatives": [n.to_json(with_caption=False) for n in self.negatives]}

    def to_json_bytes(self) -> bytes:
        return json.dumps(self.to_json(), ensure_ascii=False, separators=(",", ":")).encode("utf-8")

    def images(self) -> list[tuple[str, str]]:
        """(field name, image reference) of every image the record refers to."""
        out = [(n, s.image) for n, s in (("query", self.query), ("positive", self.positive)) if s.image]
        out += [(f"negatives[{i}]", n.image) for i, n in enumerate(self.negatives) if n.image]
        return out

    @classmethod
    def from_json(cls, key: str, obj: Mapping[str, Any] | bytes | str, stored: bool = True) -> PairRecord:
        """Parse and validate a pair payload (dict, or its encoded text); ``stored``: as read from a shard."""
        obj = json_object(key, obj)
        if "turns" in obj:
            raise RecordError(key, "json", "is an M3T pretraining record (has 'turns'), not a fine-tuning pair; "
                              "convert pairs with `muco data convert --kind pairs`", "kind")
        unknown = sorted(set(obj) - set(PAIR_FIELDS))
        if unknown:
            raise RecordError(key, "json", f"has unknown fields {unknown}; allowed: {list(PAIR_FIELDS)}")
        for name in ("query", "positive"):
            if name not in obj:
                raise RecordError(key, name, "is missing", "missing")
        negs = obj.get("negatives")
        negs = [] if negs is None else negs
        if not isinstance(negs, list):
            raise RecordError(key, "negatives", f"must be a list, got {type(negs).__name__}")
        rec = cls(key=key, query=_parse_side(key, "query", obj["query"]),
                  positive=_parse_side(key, "positive", obj["positive"]),
                  negatives=[_parse_side(key, f"negatives[{i}]", n, negative=True) for i, n in enumerate(negs)])
        return rec.validate(stored)


def _parse_side(key: str, name: str, obj: Any, negative: bool = False) -> Side:
    allowed = ("text", "image") if negative else SIDE_FIELDS
    if not isinstance(obj, Mapping):
        raise RecordError(key, name, f"must be an object {{{', '.join(allowed)}}}, got {type(obj).__name__}")
    extra = sorted(set(obj) - set(allowed))
    if extra:
        raise RecordError(key, name, f"has unknown fields {extra}; allowed: {list(allowed)}")
    if "text" not in obj:
        raise RecordError(key, f"{name}.text", "is missing", "missing")
    return Side(text=obj["text"], image=obj.get("image"), caption=obj.get("caption"))


def _side(key: str, name: str, side: Side, stored: bool) -> None:
    if side.image is not None:
        if not isinstance(side.image, str) or not side.image:
            raise RecordError(key, f"{name}.image", f"must be a non-empty string or null, got {side.image!r}")
        if stored and not MEMBER_RE.fullmatch(side.image):
            raise RecordError(key, f"{name}.image", f"must name a shard member like 'qry.jpg', got {side.image!r}")
    if not isinstance(side.text, str):
        raise RecordError(key, f"{name}.text", f"must be a string, got {type(side.text).__name__}")
    if not side.text.strip() and side.image is None:
        raise RecordError(key, f"{name}.text", "is empty and the side has no image", "empty")
    _check_text(key, f"{name}.text", side.text)
    if side.caption is not None:
        if not isinstance(side.caption, str) or not side.caption.strip():
            raise RecordError(key, f"{name}.caption", "must be a non-empty string or null", "empty")
        _check_text(key, f"{name}.caption", side.caption)


def _check_text(key: str, name: str, value: str) -> None:
    bad = find_reserved(value)
    if bad is not None:
        raise RecordError(key, name, f"contains the reserved string {bad!r}", "reserved")
    if IMAGE_MARKER in value:
        raise RecordError(key, name, f"contains the image marker {IMAGE_MARKER!r}; strip it", "marker")


def strip_markers(text: str) -> str:
    """Remove every ``<|image_1|>`` marker (with the newline or space after it); the templates place the image
    themselves, always first (docs/method.md §4)."""
    if not isinstance(text, str) or IMAGE_MARKER not in text:
        return text
    for sep in ("\n", " ", ""):
        text = text.replace(IMAGE_MARKER + sep, "")
    return text
