"""The pair kind: fine-tuning pairs -> webdataset shards (docs/method.md §2.2, §2.3, §8), through the shared
pipeline (:func:`muco.convert.pipeline.run_conversion`: process pool, ordered writer, size-capped atomic shards,
rejects, manifest).

Inputs:
- MMEB-train rows (parquet, or JSONL lines with the same columns): ``qry``, ``pos_text``, ``qry_image_path``,
  ``pos_image_path`` (``''`` = none), ``qry_sentence`` / ``pos_sentence`` (captions), ``neg_text`` /
  ``neg_image_path`` (a list, or the string form of a list). Lists are parsed as data: JSON, else a Python
  literal via ``ast.literal_eval`` (literals only; never ``eval``, which the released loader applied to these
  strings, docs/method.md §14). Negative ``i`` takes image ``neg_image_path[min(i, len - 1)]`` (the released
  clamp). ``<|image_1|>`` markers are stripped.
- Pair JSONL in the project schema: ``{"key", "query": {text, image?, caption?}, "positive": {...},
  "negatives": [{text, image?}]}``, image paths relative to ``--image-root``.

A negative identical to the positive (same text and image) is dropped: the released loader made the positive
its own hard negative for some rows (docs/method.md §14). Images are stored as members ``qry.*``, ``pos.*``,
``neg<j>.*`` (negative images de-duplicated by path). Usage::

    muco data convert --kind pairs MMEB_train/*/*.parquet --image-root imgs --output pairs/train-%06d.tar
"""

from __future__ import annotations

import ast
import json
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from muco.convert.images import ImageError, load_image
from muco.convert.limits import check_sequence_length, check_text_length
from muco.convert.pipeline import (
    EARLY_ABORT_RECORDS,
    ConvertOptions,
    ConvertSummary,
    Prepared,
    Progress,
    prepared,
    rejected,
    run_conversion,
)
from muco.convert.sources import JsonlSource, LineError, ParquetSource, Source, parse_line
from muco.data.pairs.records import PairRecord, Side, strip_markers
from muco.data.records import MAX_SEQUENCE_CHARS, MAX_TEXT_CHARS, RecordError

MMEB_COLUMNS = ("qry", "pos_text", "qry_image_path", "pos_image_path", "qry_sentence", "pos_sentence",
                "neg_text", "neg_image_path")
MMEB_REQUIRED = ("qry", "pos_text")


@dataclass(frozen=True)
class PairConvertOptions(ConvertOptions):
    max_negatives: int | None = None


def parse_list(key: str | None, name: str, value: Any) -> list[str]:
    """A list column: a list, the string form of one (JSON or a Python literal), one plain string, or empty."""
    if value is None:
        return []
    if isinstance(value, str):
        text = value.strip()
        if not text:
            return []
        if not text.startswith("["):
            return [value]
        try:
            value = json.loads(text)
        except json.JSONDecodeError:
            try:
                value = ast.literal_eval(text)  # parses literals only: data, never code
            except (ValueError, SyntaxError, MemoryError, RecursionError) as e:
                raise RecordError(key, name, f"looks like a list but is not one ({type(e).__name__}: {e})",
                                  "type") from None
    if not isinstance(value, (list, tuple)):
        raise RecordError(key, name, f"must be a list or its string form, got {type(value).__name__}")
    for i, x in enumerate(value):
        if not isinstance(x, str):
            raise RecordError(key, f"{name}[{i}]", f"must be a string, got {type(x).__name__}")
    return list(value)


def _path(value: Any) -> str | None:
    return value if isinstance(value, str) and value.strip() else None


def _caption(key: str, name: str, value: Any) -> str | None:
    if value is None or (isinstance(value, str) and not value.strip()):
        return None
    if not isinstance(value, str):
        raise RecordError(key, name, f"must be a string, got {type(value).__name__}")
    return value


def record_from_mmeb(key: str, row: dict[str, Any]) -> PairRecord:
    """One MMEB-train row (image fields still paths under the image root); not yet validated."""
    for name in MMEB_REQUIRED:
        value = row.get(name)
        if isinstance(value, (list, tuple)):
            raise RecordError(key, name, "is a list: multi-turn (M3T) rows are pretraining data; fine-tuning "
                              "pairs are single-turn", "type")
        if not isinstance(value, str):
            raise RecordError(key, name, f"must be a string, got {type(value).__name__}", "missing")
    query = Side(strip_markers(row["qry"]), _path(row.get("qry_image_path")),
                 _caption(key, "qry_sentence", row.get("qry_sentence")))
    positive = Side(strip_markers(row["pos_text"]), _path(row.get("pos_image_path")),
                    _caption(key, "pos_sentence", row.get("pos_sentence")))
    texts = parse_list(key, "neg_text", row.get("neg_text"))
    images = parse_list(key, "neg_image_path", row.get("neg_image_path"))
    negatives = []
    for i in range(len(texts) if texts else len(images)):  # image-only negatives when there is no text
        text = texts[i] if texts else ""
        image = _path(images[min(i, len(images) - 1)]) if images else None  # the released clamp
        neg = Side(strip_markers(text), image)
        if (neg.text, neg.image) != (positive.text, positive.image):
            negatives.append(neg)
    return PairRecord(key=key, query=query, positive=positive, negatives=negatives)


def record_from_line(line: str | bytes, default_key: str) -> PairRecord:
    """One JSONL line: an MMEB-train row (has ``qry``) or a project pair record (has ``query`` and ``key``);
    bytes are a line that is not UTF-8 (rejected)."""
    obj = parse_line(line, default_key)
    key = obj.pop("key", None)
    if key is not None and not isinstance(key, str):
        raise RecordError(default_key, "key", f"must be a string, got {type(key).__name__}", "key")
    if "qry" in obj:
        return record_from_mmeb(key or default_key, obj)
    if key is None:
        raise RecordError(default_key, "key", "is missing (a pair record line needs a string 'key')", "key")
    return PairRecord.from_json(key, obj, stored=False)


def check_pair_lengths(rec: PairRecord, max_text_chars: int | None = MAX_TEXT_CHARS,
                       max_sequence_chars: int | None = MAX_SEQUENCE_CHARS) -> PairRecord:
    """Raise a ``too_long`` :class:`RecordError` for a validated pair over the limits: every text and caption,
    then each fine-tuning sequence, i.e. one side's text plus the other side's counterpart (its text, and its
    caption when it has an image; docs/method.md §8.2). A negative is its own single-turn sequence."""
    key = rec.key
    for name, side in (("query", rec.query), ("positive", rec.positive)):
        check_text_length(key, f"{name}.text", side.text, max_text_chars)
        if side.caption is not None:
            check_text_length(key, f"{name}.caption", side.caption, max_text_chars)
    for i, n in enumerate(rec.negatives):
        check_text_length(key, f"negatives[{i}].text", n.text, max_text_chars)

    def counterpart(side: Side) -> int:
        return len(side.text) + (len(side.caption or "") if side.image is not None else 0)

    what = "its text and the other side's counterpart"
    check_sequence_length(key, "query sequence", len(rec.query.text) + counterpart(rec.positive),
                          max_sequence_chars, what)
    check_sequence_length(key, "target sequence", len(rec.positive.text) + counterpart(rec.query),
                          max_sequence_chars, what)
    return rec


def prepare_pair(index: int, payload: Any, key: str | None, opts: PairConvertOptions) -> Prepared:
    """The preparer of pairs (runs in the workers): a parquet row dict or a JSONL line."""
    try:
        rec = record_from_mmeb(key, payload) if isinstance(payload, dict) else record_from_line(payload, key)
        key = rec.key
        if opts.max_negatives is not None:
            rec.negatives = rec.negatives[: opts.max_negatives]
        rec.validate()
        check_pair_lengths(rec, opts.max_text_chars, opts.max_sequence_chars)
        members: list[tuple[str, bytes]] = []
        stored: dict[str, str] = {}  # negative image path -> member name

        def member(role: str, field_name: str, rel: str) -> str:
            try:
                ext, data = load_image(opts.image_root, rel, opts.max_side, opts.jpeg_quality)
            except ImageError as e:
                raise ImageError(e.reason, f"record {key!r}: {field_name} {e}") from None
            members.append((f"{role}.{ext}", data))
            return f"{role}.{ext}"

        for role, name, side in (("qry", "query", rec.query), ("pos", "positive", rec.positive)):
            if side.image is not None:
                side.image = member(role, f"{name}.image", side.image)
        for i, neg in enumerate(rec.negatives):
            if neg.image is not None:
                if neg.image not in stored:
                    stored[neg.image] = member(f"neg{len(stored)}", f"negatives[{i}].image", neg.image)
                neg.image = stored[neg.image]
    except (RecordError, ImageError, LineError) as e:
        return rejected(index, key, e)
    return prepared(key, [*members, ("json", rec.to_json_bytes())])


def _stem_prefix(path: str) -> str:
    return re.sub(r"[^A-Za-z0-9_-]", "_", Path(path).stem) + "_"


def convert_pairs(inputs: str | os.PathLike | list, image_root: str | os.PathLike, output: str, *,
                  fmt: str = "auto", max_negatives: int | None = None, max_side: int | None = None,
                  jpeg_quality: int = 90, max_samples_per_shard: int = 1000, max_bytes_per_shard: int = 1 << 30,
                  workers: int = 0, manifest: str | None = None, rejects: str | None = None,
                  key_prefix: str | None = None, batch_rows: int = 1024, limit: int | None = None,
                  overwrite: bool = False, max_text_chars: int | None = MAX_TEXT_CHARS,
                  max_sequence_chars: int | None = MAX_SEQUENCE_CHARS, part: tuple[int, int] | None = None,
                  progress: Progress | None = None, early_abort: int = EARLY_ABORT_RECORDS) -> ConvertSummary:
    """MMEB-train parquet(s), or one JSONL (MMEB-train rows or pair records), -> pair shards + manifest.

    Parquet keys are ``<dir>_<file stem>_<row:09d>`` (MMEB-train keeps one directory per subset); JSONL keys
    are the line's ``key``, else ``<file stem>_<line:09d>``; ``key_prefix`` replaces the prefix. Length limits
    (0 or None: none): see ``check_pair_lengths``. ``part``, ``progress``, ``early_abort`` and resuming: see
    :func:`muco.convert.pipeline.run_conversion`."""
    paths = [str(p) for p in (inputs if isinstance(inputs, list) else [inputs])]
    if fmt == "auto":
        fmt = "jsonl" if paths[0].endswith((".jsonl", ".json")) else "parquet"
    opts = PairConvertOptions(str(image_root), max_side=max_side, jpeg_quality=jpeg_quality,
                              max_text_chars=max_text_chars or None, max_sequence_chars=max_sequence_chars or None,
                              max_negatives=max_negatives)
    items: Source
    if fmt == "parquet":
        items = ParquetSource(paths, MMEB_COLUMNS, optional=tuple(c for c in MMEB_COLUMNS if c not in MMEB_REQUIRED),
                              key_prefix=key_prefix, batch_rows=batch_rows, limit=limit, stem_parts=2)
    elif fmt == "jsonl":
        if len(paths) != 1:
            raise ValueError("give exactly one JSONL input")
        prefix = key_prefix if key_prefix is not None else _stem_prefix(paths[0])
        items = JsonlSource(paths[0], limit, key_prefix=prefix)
    else:
        raise ValueError(f"unknown format {fmt!r}; use parquet or jsonl")
    return run_conversion(prepare_pair, items, output, opts, max_samples_per_shard=max_samples_per_shard,
                          max_bytes_per_shard=max_bytes_per_shard, workers=workers, manifest=manifest,
                          rejects=rejects, overwrite=overwrite, source=",".join(paths),
                          manifest_extra={"kind": "pairs", "max_negatives": max_negatives},
                          unit="line" if fmt == "jsonl" else "row", part=part, progress=progress,
                          early_abort=early_abort)


__all__ = ["MMEB_COLUMNS", "MMEB_REQUIRED", "PairConvertOptions", "check_pair_lengths", "convert_pairs",
           "parse_list", "prepare_pair", "record_from_line", "record_from_mmeb"]
