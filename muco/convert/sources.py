"""Input sources of a conversion: items ``(index, payload, key)`` for the pipeline, read lazily.

- Parquet: one dict of the wanted columns per row, read in row batches, so a large table (the released
  ``M3T.parquet`` is 1.95 GB) never sits in memory; the index is the row number within its file.
- JSONL: one line per item, the index its line number; :func:`parse_line` turns a line into a dict (in the
  workers), rejecting lines that are not UTF-8, not JSON or not a JSON object with a :class:`LineError`.

Both check their inputs when called, not when first iterated, so a wrong input fails before an earlier
conversion's output is replaced.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any


class LineError(ValueError):
    """A JSONL line that is not a record at all: undecodable bytes, not JSON, not a JSON object."""

    def __init__(self, reason: str, message: str, key: str | None = None) -> None:
        self.reason, self.key = reason, key
        super().__init__(message)


def parse_line(payload: str | bytes, key: str | None = None) -> dict[str, Any]:
    """One JSONL line as a dict; bytes are lines that did not decode as UTF-8 (see :func:`jsonl_items`)."""
    if isinstance(payload, (bytes, bytearray)):
        try:
            payload = bytes(payload).decode("utf-8")
        except UnicodeDecodeError as e:
            raise LineError("encoding", f"is not valid UTF-8 (byte 0x{payload[e.start]:02x} at byte {e.start + 1} "
                            "of the line); re-encode the file as UTF-8, e.g. iconv -f latin1 -t utf-8", key) from None
    try:
        obj = json.loads(payload)
    except RecursionError:
        raise LineError("json", "is nested too deeply to parse as JSON", key) from None
    except ValueError as e:  # JSONDecodeError, and e.g. integers past Python's digit limit
        raise LineError("json", f"is not valid JSON ({e})", key) from None
    if not isinstance(obj, dict):
        raise LineError("json", f"must be a JSON object, got {type(obj).__name__}", key)
    return obj


def parquet_items(paths: list[str], columns: tuple[str, ...], *, optional: tuple[str, ...] = (),
                  key_prefix: str | None = None, batch_rows: int = 1024, limit: int | None = None,
                  stem_parts: int = 1) -> Iterator[tuple[int, dict[str, Any], str]]:
    """(row, row dict, key) of the ``columns`` (those in ``optional`` may be absent from a file); keys are
    ``<prefix><row:09d>``, the default prefix made of the last ``stem_parts`` path components (directory names,
    then the file stem). At most ``limit`` rows over all files. Every file's schema is checked now: a wrong input
    fails before an earlier conversion is replaced."""
    import pyarrow.parquet as pq

    files = []
    for path in paths:
        if not os.path.isfile(path):
            raise FileNotFoundError(f"input {path} does not exist or is not a file; fix the path")
        pf = pq.ParquetFile(path)
        names = set(pf.schema_arrow.names)
        missing = [c for c in columns if c not in names and c not in optional]
        if missing:
            raise ValueError(f"{path}: missing columns {missing}; found {sorted(names)}")
        files.append((path, pf, [c for c in columns if c in names]))

    def rows() -> Iterator[tuple[int, dict[str, Any], str]]:
        n = 0
        for path, pf, present in files:
            prefix = key_prefix
            if prefix is None:
                parts = Path(path).with_suffix("").parts[-stem_parts:]
                prefix = re.sub(r"[^A-Za-z0-9_-]", "_", "_".join(parts)) + "_"
            row = 0
            for batch in pf.iter_batches(batch_size=batch_rows, columns=present):
                for r in batch.to_pylist():
                    if limit is not None and n >= limit:
                        return
                    yield row, r, f"{prefix}{row:09d}"
                    row += 1
                    n += 1

    return rows()


def jsonl_items(path: str, limit: int | None = None) -> Iterator[tuple[int, str | bytes, None]]:
    """(line number, line, None) of the non-blank lines, at most ``limit``; a line that is not UTF-8 stays bytes
    (the preparer rejects it, naming the line) instead of ending the whole conversion. Opens the file now: a
    wrong path fails before an earlier conversion is replaced."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"input {path} does not exist or is not a file; fix the path")
    f = open(path, "rb")  # noqa: SIM115 -- closed by the generator

    def lines() -> Iterator[tuple[int, str | bytes, None]]:
        with f:
            n = 0
            for lineno, raw in enumerate(f, 1):
                if lineno == 1 and raw.startswith(b"\xef\xbb\xbf"):  # a UTF-8 byte-order mark
                    raw = raw[3:]
                if not raw.strip():
                    continue
                if limit is not None and n >= limit:
                    return
                try:
                    line: str | bytes = raw.decode("utf-8")
                except UnicodeDecodeError:
                    line = raw
                yield lineno, line, None
                n += 1

    return lines()


__all__ = ["LineError", "jsonl_items", "parquet_items", "parse_line"]
