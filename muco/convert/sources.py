"""Input sources of a conversion: items ``(index, payload, key)`` for the pipeline, read lazily.

- Parquet: one dict of the wanted columns per row, read in row batches, so a large table (the released
  ``M3T.parquet`` is 1.95 GB) never sits in memory; the index is the row number within its file.
- JSONL: one line per item, the index its line number; :func:`parse_line` turns a line into a dict (in the
  workers), rejecting lines that are not UTF-8, not JSON or not a JSON object with a :class:`LineError`.

A :class:`Source` numbers its items 0, 1, ... over all of its files in input order (the *position*), so that a
conversion can take a contiguous range of them (``--part I/N``) or continue after the last finished shard
(resume) without converting what comes before: a parquet source finds a position from the file and row-group
row counts in the parquet metadata and reads only the row groups that hold the range; a JSONL source reads and
skips the lines before it. The index (row or line number within its file) and the key of an item do not depend
on where reading started, so a part or a resumed run writes exactly what a single run writes.

Both check their inputs when constructed, not when first iterated, so a wrong input fails before an earlier
conversion's output is touched.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Iterable, Iterator
from itertools import islice
from pathlib import Path
from typing import Any

Item = tuple[int, Any, "str | None"]  # (row or line number, payload, key or None)


class LineError(ValueError):
    """A JSONL line that is not a record at all: undecodable bytes, not JSON, not a JSON object."""

    def __init__(self, reason: str, message: str, key: str | None = None) -> None:
        self.reason, self.key = reason, key
        super().__init__(message)


def parse_line(payload: str | bytes, key: str | None = None) -> dict[str, Any]:
    """One JSONL line as a dict; bytes are lines that did not decode as UTF-8 (see :class:`JsonlSource`)."""
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


class Source:
    """Items of one conversion input, addressable by position (0-based over all files, in input order).

    ``unit`` names the index in rejects and messages ("row" of a parquet, "line" of a JSONL); ``description``
    is the ``source`` of the manifest; :meth:`fingerprint` is what a resumed run or a merged part must share
    with the run that started the output (paths, sizes, the row limit, the key scheme)."""

    unit = "item"
    description = ""

    def known_count(self) -> int | None:
        """The number of items when it is known without reading them (parquet metadata), else None."""
        return None

    def count(self) -> int:
        """The number of items, reading the input if that is the only way (JSONL)."""
        raise NotImplementedError

    def items(self, start: int = 0, stop: int | None = None) -> Iterator[Item]:
        """The items at positions ``start`` .. ``stop - 1`` (to the end when ``stop`` is None)."""
        raise NotImplementedError

    def fingerprint(self) -> dict[str, Any]:
        return {"source": self.description}

    def __iter__(self) -> Iterator[Item]:
        return self.items()


def is_source(obj: Any) -> bool:
    """Whether ``obj`` is a source (this module's, or a wrapper with the same methods, e.g. the download join)
    rather than a plain iterable of items."""
    return all(callable(getattr(obj, name, None)) for name in ("items", "count", "known_count", "fingerprint"))


class IterableSource(Source):
    """Any iterable of items (a library caller's own list or generator); it can be read once."""

    def __init__(self, items: Iterable[Item], unit: str = "item", description: str = "") -> None:
        self._items, self.unit, self.description = items, unit, description

    def count(self) -> int:
        if not hasattr(self._items, "__len__"):
            raise ValueError("this input's items can be read only once, so it cannot be split into parts")
        return len(self._items)  # type: ignore[arg-type]

    def known_count(self) -> int | None:
        return len(self._items) if hasattr(self._items, "__len__") else None  # type: ignore[arg-type]

    def items(self, start: int = 0, stop: int | None = None) -> Iterator[Item]:
        return islice(iter(self._items), start, stop)


def _input_fingerprint(paths: list[str]) -> list[list]:
    return [[os.path.abspath(p), os.path.getsize(p)] for p in paths]


class ParquetSource(Source):
    """Rows of one or more parquet files (see :func:`parquet_items`)."""

    unit = "row"

    def __init__(self, paths: list[str], columns: tuple[str, ...], *, optional: tuple[str, ...] = (),
                 key_prefix: str | None = None, batch_rows: int = 1024, limit: int | None = None,
                 stem_parts: int = 1) -> None:
        import pyarrow.parquet as pq

        if limit is not None and limit < 0:
            raise ValueError("--limit must be >= 0")
        self.paths, self.key_prefix, self.batch_rows, self.limit = list(paths), key_prefix, batch_rows, limit
        self.description = ",".join(self.paths)
        self.files = []
        for path in self.paths:
            if not os.path.isfile(path):
                raise FileNotFoundError(f"input {path} does not exist or is not a file; fix the path")
            pf = pq.ParquetFile(path)
            names = set(pf.schema_arrow.names)
            missing = [c for c in columns if c not in names and c not in optional]
            if missing:
                raise ValueError(f"{path}: missing columns {missing}; found {sorted(names)}")
            prefix = key_prefix
            if prefix is None:
                parts = Path(path).with_suffix("").parts[-stem_parts:]
                prefix = re.sub(r"[^A-Za-z0-9_-]", "_", "_".join(parts)) + "_"
            groups = [pf.metadata.row_group(g).num_rows for g in range(pf.metadata.num_row_groups)]
            self.files.append((pf, [c for c in columns if c in names], prefix, groups))
        total = sum(sum(g) for _, _, _, g in self.files)
        self.total = total if limit is None else min(total, limit)

    def known_count(self) -> int:
        return self.total

    def count(self) -> int:
        return self.total

    def fingerprint(self) -> dict[str, Any]:
        return {"source": self.description, "inputs": _input_fingerprint(self.paths), "limit": self.limit,
                "key_prefix": self.key_prefix, "rows": self.total}

    def items(self, start: int = 0, stop: int | None = None) -> Iterator[Item]:
        stop = self.total if stop is None else min(stop, self.total)
        return self._rows(start, stop)

    def _rows(self, start: int, stop: int) -> Iterator[Item]:
        offset = 0  # position of the current file's row 0
        for pf, present, prefix, groups in self.files:
            n = sum(groups)
            lo, hi = max(start - offset, 0), min(stop - offset, n)  # this file's rows to read
            offset += n
            if lo >= hi:
                continue
            # only the row groups that hold rows lo..hi-1: the metadata says where each begins, so a part or a
            # resumed run does not decode the rows before it (except within the first group it reads)
            wanted, first, g0 = [], None, 0
            for g, rows in enumerate(groups):
                if g0 < hi and g0 + rows > lo:
                    wanted.append(g)
                    first = g0 if first is None else first
                g0 += rows
            row = first or 0
            for batch in pf.iter_batches(batch_size=self.batch_rows, row_groups=wanted, columns=present):
                b0, b1 = max(lo - row, 0), min(hi - row, batch.num_rows)
                if b0 < b1:  # slice before converting: skipped rows never become Python objects
                    for i, r in enumerate(batch.slice(b0, b1 - b0).to_pylist(), row + b0):
                        yield i, r, f"{prefix}{i:09d}"
                row += batch.num_rows
                if row >= hi:
                    break


class JsonlSource(Source):
    """The non-blank lines of one JSONL file (see :func:`jsonl_items`); keys are ``<key_prefix><line:09d>``
    when ``key_prefix`` is given, else None (the line's own)."""

    unit = "line"

    def __init__(self, path: str, limit: int | None = None, key_prefix: str | None = None) -> None:
        if not os.path.isfile(path):
            raise FileNotFoundError(f"input {path} does not exist or is not a file; fix the path")
        if limit is not None and limit < 0:
            raise ValueError("--limit must be >= 0")
        self.path, self.limit, self.key_prefix, self.description = path, limit, key_prefix, path
        self._count: int | None = None

    def fingerprint(self) -> dict[str, Any]:
        return {"source": self.description, "inputs": _input_fingerprint([self.path]), "limit": self.limit,
                "key_prefix": self.key_prefix}

    def count(self) -> int:
        if self._count is None:
            self._count = sum(1 for _ in self._lines(0, None, decode=False))
        return self._count

    def items(self, start: int = 0, stop: int | None = None) -> Iterator[Item]:
        return self._lines(start, stop, decode=True)

    def _lines(self, start: int, stop: int | None, decode: bool) -> Iterator[Item]:
        if self.limit is not None:
            stop = self.limit if stop is None else min(stop, self.limit)
        with open(self.path, "rb") as f:
            n = 0  # position of the next non-blank line
            for lineno, raw in enumerate(f, 1):
                if lineno == 1 and raw.startswith(b"\xef\xbb\xbf"):  # a UTF-8 byte-order mark
                    raw = raw[3:]
                if not raw.strip():
                    continue
                if stop is not None and n >= stop:
                    return
                n += 1
                if n <= start:
                    continue
                line: str | bytes = raw
                if decode:
                    try:
                        line = raw.decode("utf-8")
                    except UnicodeDecodeError:
                        pass  # stays bytes: the preparer rejects it, naming the line
                key = None if self.key_prefix is None else f"{self.key_prefix}{lineno:09d}"
                yield lineno, line, key


def parquet_items(paths: list[str], columns: tuple[str, ...], *, optional: tuple[str, ...] = (),
                  key_prefix: str | None = None, batch_rows: int = 1024, limit: int | None = None,
                  stem_parts: int = 1) -> ParquetSource:
    """A :class:`ParquetSource`: (row, row dict, key) of the ``columns`` (those in ``optional`` may be absent
    from a file); keys are ``<prefix><row:09d>``, the default prefix made of the last ``stem_parts`` path
    components (directory names, then the file stem). At most ``limit`` rows over all files. Every file's schema
    is checked now: a wrong input fails before an earlier conversion is replaced. Iterate ``.items()``."""
    return ParquetSource(paths, columns, optional=optional, key_prefix=key_prefix, batch_rows=batch_rows,
                         limit=limit, stem_parts=stem_parts)


def jsonl_items(path: str, limit: int | None = None, key_prefix: str | None = None) -> JsonlSource:
    """A :class:`JsonlSource`: (line number, line, key) of the non-blank lines, at most ``limit``; a line that is
    not UTF-8 stays bytes (the preparer rejects it, naming the line) instead of ending the whole conversion.
    Checks the path now: a wrong path fails before an earlier conversion is replaced. Iterate ``.items()``."""
    return JsonlSource(path, limit, key_prefix)


__all__ = ["IterableSource", "Item", "JsonlSource", "LineError", "ParquetSource", "Source", "is_source",
           "jsonl_items", "parquet_items", "parse_line"]
