"""Fine-tuning pairs -> webdataset shards (METHOD.md §2.2, §2.3, §8), on the M3T converter's framework
(``muco.data.convert._run``: process pool, ordered writer, size-capped atomic shards, rejects, manifest).

Inputs:
- MMEB-train rows (parquet, or JSONL lines with the same columns): ``qry``, ``pos_text``, ``qry_image_path``,
  ``pos_image_path`` (``''`` = none), ``qry_sentence`` / ``pos_sentence`` (captions), ``neg_text`` /
  ``neg_image_path`` (a list, or the string form of a list). Lists are parsed as data: JSON, else a Python
  literal via ``ast.literal_eval`` (literals only; never ``eval``, pitfall 10). Negative ``i`` takes image
  ``neg_image_path[min(i, len - 1)]`` (the released clamp). ``<|image_1|>`` markers are stripped.
- Pair JSONL in the project schema: ``{"key", "query": {text, image?, caption?}, "positive": {...},
  "negatives": [{text, image?}]}``, image paths relative to ``--image-root``.

A negative identical to the positive (same text and image) is dropped: the released loader made the positive
its own hard negative for some rows (pitfall 12). Images are stored as members ``qry.*``, ``pos.*``, ``neg<j>.*``
(negative images de-duplicated by path). Usage::

    muco data convert --kind pairs MMEB_train/*/*.parquet --image-root imgs --output pairs/train-%06d.tar
"""

from __future__ import annotations

import argparse
import ast
import json
import os
import re
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from muco.data.convert import (
    ConvertOptions,
    ConvertSummary,
    ImageError,
    _jsonl_items,
    _parquet_items,
    _run,
    load_image,
)
from muco.data.pair_records import PairRecord, Side, strip_markers
from muco.data.records import RecordError

MMEB_COLUMNS = ("qry", "pos_text", "qry_image_path", "pos_image_path", "qry_sentence", "pos_sentence",
                "neg_text", "neg_image_path")
MMEB_REQUIRED = ("qry", "pos_text")


@dataclass(frozen=True)
class PairConvertOptions(ConvertOptions):
    turns: int | None = None  # pairs have no turns
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


def record_from_line(line: str, default_key: str) -> PairRecord:
    """One JSONL line: an MMEB-train row (has ``qry``) or a project pair record (has ``query`` and ``key``)."""
    try:
        obj = json.loads(line)
    except json.JSONDecodeError as e:
        raise RecordError(default_key, "line", f"is not valid JSON ({e})", "json") from None
    if not isinstance(obj, dict):
        raise RecordError(default_key, "line", f"must be an object, got {type(obj).__name__}", "json")
    key = obj.pop("key", None)
    if key is not None and not isinstance(key, str):
        raise RecordError(default_key, "key", f"must be a string, got {type(key).__name__}", "key")
    if "qry" in obj:
        return record_from_mmeb(key or default_key, obj)
    if key is None:
        raise RecordError(default_key, "key", "is missing (a pair record line needs a string 'key')", "key")
    return PairRecord.from_json(key, obj, stored=False)


def prepare_pair(index: int, payload: Any, key: str | None, opts: PairConvertOptions) -> tuple:
    """One input item -> ("ok", key, members) or ("bad", key, index, reason, message); runs in workers."""
    try:
        rec = record_from_mmeb(key, payload) if isinstance(payload, dict) else record_from_line(payload, key)
        key = rec.key
        if opts.max_negatives is not None:
            rec.negatives = rec.negatives[: opts.max_negatives]
        rec.validate()
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
    except (RecordError, ImageError) as e:
        return ("bad", getattr(e, "key", None) or key, index, e.reason, str(e))
    return ("ok", key, [*members, ("json", rec.to_json_bytes())])


def _stem_prefix(path: str) -> str:
    return re.sub(r"[^A-Za-z0-9_-]", "_", Path(path).stem) + "_"


def convert_pairs(inputs: str | os.PathLike | list, image_root: str | os.PathLike, output: str, *,
                  fmt: str = "auto", max_negatives: int | None = None, max_side: int | None = None,
                  jpeg_quality: int = 90, max_samples_per_shard: int = 1000, max_bytes_per_shard: int = 1 << 30,
                  workers: int = 0, manifest: str | None = None, rejects: str | None = None,
                  key_prefix: str | None = None, batch_rows: int = 1024, limit: int | None = None,
                  overwrite: bool = False) -> ConvertSummary:
    """MMEB-train parquet(s), or one JSONL (MMEB-train rows or pair records), -> pair shards + manifest.

    Parquet keys are ``<dir>_<file stem>_<row:09d>`` (MMEB-train keeps one directory per subset); JSONL keys
    are the line's ``key``, else ``<file stem>_<line:09d>``; ``key_prefix`` replaces the prefix."""
    paths = [str(p) for p in (inputs if isinstance(inputs, list) else [inputs])]
    if fmt == "auto":
        fmt = "jsonl" if paths[0].endswith((".jsonl", ".json")) else "parquet"
    opts = PairConvertOptions(str(image_root), max_side=max_side, jpeg_quality=jpeg_quality,
                              max_negatives=max_negatives)
    if fmt == "parquet":
        items = _parquet_items(paths, key_prefix, batch_rows, limit, wanted=MMEB_COLUMNS,
                               optional=tuple(c for c in MMEB_COLUMNS if c not in MMEB_REQUIRED), stem_parts=2)
    elif fmt == "jsonl":
        if len(paths) != 1:
            raise ValueError("give exactly one JSONL input")
        prefix = key_prefix if key_prefix is not None else _stem_prefix(paths[0])
        items = ((i, line, f"{prefix}{i:09d}") for i, line, _ in _jsonl_items(paths[0], limit))
    else:
        raise ValueError(f"unknown format {fmt!r}; use parquet or jsonl")
    return _run(prepare_pair, items, output, opts, max_samples_per_shard=max_samples_per_shard,
                max_bytes_per_shard=max_bytes_per_shard, workers=workers, manifest=manifest, rejects=rejects,
                overwrite=overwrite, source=",".join(paths),
                manifest_extra={"kind": "pairs", "max_negatives": max_negatives})


def main_pairs(args: argparse.Namespace) -> int:
    """``muco data convert --kind pairs ...`` (arguments parsed by ``muco.data.convert_cli.build_parser``)."""
    try:
        summary = convert_pairs(
            args.inputs, args.image_root, args.output, fmt=args.format, max_negatives=args.max_negatives,
            max_side=args.max_side, jpeg_quality=args.jpeg_quality,
            max_samples_per_shard=args.max_samples_per_shard, max_bytes_per_shard=args.max_bytes_per_shard,
            workers=args.workers, manifest=args.manifest, rejects=args.rejects, key_prefix=args.key_prefix,
            limit=args.limit, overwrite=args.overwrite)
    except (OSError, ValueError) as e:
        print(f"muco data convert: error: {e}", file=sys.stderr)
        return 2
    print(summary)
    return 0 if summary.written else 1


__all__ = ["PairConvertOptions", "convert_pairs", "parse_list", "prepare_pair", "record_from_line",
           "record_from_mmeb"]
