"""What every record kind shares: the error type, keys, the released image marker, JSON payloads and the length
limits applied at conversion (rejects) and in training (skips)."""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from typing import Any

IMAGE_MARKER = "<|image_1|>"
# '.' would split the webdataset key from its extension, '/' would create member directories
KEY_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_\-]*")
# Length limits in characters (str length), shared by the converter (rejects) and the training stream (skips).
# docs/method.md §13.3 gives averages, no maxima: 0.60 M target / 1.25 M query tokens per 1,024 7-turn sequences, i.e.
# ~590 tokens per target sequence and ~530 text tokens per query sequence once its ~690 image tokens (§10, 640-px
# short side) are taken off; §10 quotes 25 tokens for an average MMEB text. At ~4 characters per Qwen2 token that
# is ~2,200 characters of text per sequence and ~300 per turn, the dense-caption (ret) target being the longest.
# The defaults leave ample room above those averages and still bound a padded batch: 4,096 characters (~1,000
# tokens) per text, 16,384 (~4,000 tokens, ~7x the average) per sequence.
MAX_TEXT_CHARS = 4096  # one text: a query candidate, a target, a negative, a pair side's text or caption
MAX_SEQUENCE_CHARS = 16384  # the user texts of one sequence (every stored turn; the longest candidate of each)



class RecordError(ValueError):
    """A record that breaks the schema; ``reason`` is a short category for summaries."""

    def __init__(self, key: str | None, field_name: str, problem: str, reason: str = "type") -> None:
        self.key, self.field, self.reason = key, field_name, reason
        super().__init__(f"record {key!r}: {field_name} {problem}")


def json_object(key: str, obj: Mapping[str, Any] | bytes | str) -> Mapping[str, Any]:
    """A record payload as a mapping: encoded JSON is parsed; anything else than an object is a RecordError."""
    if isinstance(obj, (bytes, bytearray, str)):
        try:
            obj = json.loads(obj)
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise RecordError(key, "json", f"is not valid JSON ({e})", "json") from None
    if not isinstance(obj, Mapping):
        raise RecordError(key, "json", f"must be an object, got {type(obj).__name__}", "json")
    return obj


def strip_image_marker(text: str) -> str:
    """Drop a leading ``<|image_1|>`` (and the newline after it) from a released query string."""
    if isinstance(text, str) and text.startswith(IMAGE_MARKER):
        text = text[len(IMAGE_MARKER):]
        if text.startswith("\n"):
            text = text[1:]
    return text
