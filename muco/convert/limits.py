"""Text length limits every record kind applies at conversion time (``--max-text-chars``,
``--max-sequence-chars``): a record over them is rejected as ``too_long`` instead of reaching training."""

from __future__ import annotations

from muco.data.records import RecordError


def check_text_length(key: str, name: str, text: str, limit: int | None) -> None:
    """One text (a query candidate, target, negative, pair text or caption) against ``--max-text-chars``."""
    if limit and len(text) > limit:
        raise RecordError(key, name, f"has {len(text):,} characters, over the limit of {limit:,} (--max-text-chars); "
                          "shorten it or raise the limit (0: none)", "too_long")


def check_sequence_length(key: str, name: str, chars: int, limit: int | None, what: str) -> None:
    """The characters of text in one sequence (``what`` says which texts were counted) against
    ``--max-sequence-chars``."""
    if limit and chars > limit:
        raise RecordError(key, name, f"has {chars:,} characters of text ({what}), over the limit of {limit:,} "
                          "(--max-sequence-chars); shorten the record or raise the limit (0: none)", "too_long")


__all__ = ["check_sequence_length", "check_text_length"]
