"""The M3T record kind: pretraining records -> shards of ``{key}.<jpg|png|webp>`` + ``{key}.json``
(docs/method.md §2.3), through :func:`muco.convert.pipeline.run_conversion`.

Inputs: (a) the released parquet (``qry`` = per-turn candidate lists, ``pos_text``, ``qry_image_path``,
``qry_sentence``), read in row batches so the 1.95 GB table never sits in memory; (b) a JSONL of records in the
project schema with ``image`` relative to the image root. A record is rejected (counted, and listed in the
rejects with its row or line number) when it breaks the schema, when its image is missing or unreadable, and when
its texts are over the length limits (:func:`check_m3t_lengths`); JSONL lines that are not UTF-8 or not JSON too.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from muco.convert.downloaded import download_failure, downloaded_items, is_download_dir
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
from muco.convert.sources import JsonlSource, LineError, parquet_items, parse_line
from muco.data.m3t.records import M3T_TASKS, M3TRecord, turns_from_lists
from muco.data.records import MAX_SEQUENCE_CHARS, MAX_TEXT_CHARS, RecordError

# neg_text and pos_sentence are unused in pretraining (docs/method.md §2.2), so they are never read
PARQUET_COLUMNS = ("qry", "pos_text", "qry_image_path", "qry_sentence")


@dataclass(frozen=True)
class M3TOptions(ConvertOptions):
    turns: int | None = 7  # expected turns per record; None: not checked


def record_from_row(key: str, row: dict[str, Any]) -> tuple[M3TRecord, Any]:
    """One released parquet row -> (record, image path); the record is not yet validated."""
    qry, pos = row.get("qry"), row.get("pos_text")
    tasks = M3T_TASKS if isinstance(qry, list) and len(qry) == len(M3T_TASKS) else ()
    turns = turns_from_lists(key, qry, pos, tasks)  # type: ignore[arg-type]
    caption = row.get("qry_sentence")
    caption = caption if isinstance(caption, str) and caption.strip() else None  # unused in pretraining
    return M3TRecord(key=key, image=None, turns=turns, caption=caption), row.get("qry_image_path")


def record_from_line(line: str | bytes) -> tuple[M3TRecord, Any]:
    """One JSONL line ``{key, image, turns, caption?, negatives?}`` -> (record, image path); not yet validated."""
    obj = parse_line(line)
    if not isinstance(obj.get("key"), str):
        raise RecordError(None, "key", "is missing (each line needs a string 'key')", "key")
    key = obj.pop("key")
    image = obj.pop("image", None)
    return M3TRecord.from_json(key, obj), image


def check_m3t_lengths(rec: M3TRecord, max_text_chars: int | None = MAX_TEXT_CHARS,
                      max_sequence_chars: int | None = MAX_SEQUENCE_CHARS) -> M3TRecord:
    """Raise a ``too_long`` :class:`RecordError` for a validated record over the limits: every query candidate,
    target and negative text, then the query sequence (all stored turns, the longest candidate of each: the
    longest sequence training can draw) and the target sequence. The unused caption is not limited."""
    key = rec.key
    for i, t in enumerate(rec.turns):
        for j, q in enumerate(t.queries):
            check_text_length(key, f"turns[{i}].queries[{j}]", q, max_text_chars)
        check_text_length(key, f"turns[{i}].target", t.target, max_text_chars)
    for i, n in enumerate(rec.negatives or ()):
        check_text_length(key, f"negatives[{i}].text", n.text, max_text_chars)
    what = f"{len(rec.turns)} turns"
    check_sequence_length(key, "query sequence", sum(max(map(len, t.queries)) for t in rec.turns),
                          max_sequence_chars, f"{what}, the longest candidate of each")
    check_sequence_length(key, "target sequence", sum(len(t.target) for t in rec.turns), max_sequence_chars, what)
    return rec


def _prepare(index: int, key: str | None, read: Callable[[], tuple[M3TRecord, Any]], opts: M3TOptions) -> Prepared:
    try:
        record, image_rel = read()
        key = record.key
        record.validate(opts.turns)
        check_m3t_lengths(record, opts.max_text_chars, opts.max_sequence_chars)
        ext, data = load_image(opts.image_root, image_rel, opts.max_side, opts.jpeg_quality)
    except (RecordError, ImageError, LineError) as e:
        return rejected(index, key, e)
    return prepared(key, [(ext, data), ("json", record.to_json_bytes())])


def prepare_row(index: int, row: dict[str, Any], key: str, opts: M3TOptions) -> Prepared:
    """The preparer of parquet rows (runs in the workers); a row whose image did not download (marked by
    ``muco.convert.downloaded.downloaded_items``) is a ``download_failed`` / ``not_downloaded`` reject."""
    failure = download_failure(row)
    if failure is not None:
        return rejected(index, key, failure)
    return _prepare(index, key, lambda: record_from_row(key, row), opts)


def prepare_line(index: int, line: str | bytes, key: str | None, opts: M3TOptions) -> Prepared:
    """The preparer of JSONL lines (runs in the workers); the key is the line's own."""
    return _prepare(index, key, lambda: record_from_line(line), opts)


def _options(image_root: str | os.PathLike, turns: int | None, max_side: int | None, jpeg_quality: int,
             max_text_chars: int | None, max_sequence_chars: int | None) -> M3TOptions:
    return M3TOptions(str(image_root), max_side=max_side, jpeg_quality=jpeg_quality,
                      max_text_chars=max_text_chars or None, max_sequence_chars=max_sequence_chars or None,
                      turns=turns)


def convert_parquet(parquet: str | os.PathLike | list, image_root: str | os.PathLike | None, output: str, *,
                    turns: int | None = 7, max_side: int | None = None, jpeg_quality: int = 90,
                    max_samples_per_shard: int = 1000, max_bytes_per_shard: int = 1 << 30, workers: int = 0,
                    manifest: str | None = None, rejects: str | None = None, key_prefix: str | None = None,
                    batch_rows: int = 1024, limit: int | None = None, overwrite: bool = False,
                    max_text_chars: int | None = MAX_TEXT_CHARS,
                    max_sequence_chars: int | None = MAX_SEQUENCE_CHARS,
                    downloaded: str | os.PathLike | None = None, part: tuple[int, int] | None = None,
                    progress: Progress | None = None, early_abort: int = EARLY_ABORT_RECORDS) -> ConvertSummary:
    """Released M3T parquet(s) -> shards. Keys are ``<file stem>_<row:09d>`` unless ``key_prefix`` is set.
    ``max_text_chars`` / ``max_sequence_chars``: length limits (0 or None: none), see ``check_m3t_lengths``.
    ``downloaded``: a ``muco data download`` directory to read the images from (``image_root`` is then unused);
    an ``image_root`` that is one is taken as such. ``part``, ``progress``, ``early_abort`` and resuming: see
    :func:`muco.convert.pipeline.run_conversion`."""
    paths = [str(p) for p in (parquet if isinstance(parquet, list) else [parquet])]
    if downloaded is None and is_download_dir(image_root):
        downloaded = image_root
    image_root = image_root if downloaded is None else downloaded
    opts = _options(image_root, turns, max_side, jpeg_quality, max_text_chars, max_sequence_chars)
    items = parquet_items(paths, PARQUET_COLUMNS, optional=("qry_sentence",), key_prefix=key_prefix,
                          batch_rows=batch_rows, limit=limit)
    if downloaded is not None:  # rows -> downloaded files or failures, here in the main process
        items = downloaded_items(items, downloaded)
    # keys are row numbers, so the duplicate check is skipped
    return run_conversion(prepare_row, items, output, opts, max_samples_per_shard=max_samples_per_shard,
                          max_bytes_per_shard=max_bytes_per_shard, workers=workers, manifest=manifest,
                          rejects=rejects, overwrite=overwrite, source=",".join(paths),
                          manifest_extra={"turns": opts.turns}, check_duplicates=False, part=part,
                          progress=progress, early_abort=early_abort)


def convert_jsonl(jsonl: str | os.PathLike, image_root: str | os.PathLike, output: str, *,
                  turns: int | None = 7, max_side: int | None = None, jpeg_quality: int = 90,
                  max_samples_per_shard: int = 1000, max_bytes_per_shard: int = 1 << 30, workers: int = 0,
                  manifest: str | None = None, rejects: str | None = None, limit: int | None = None,
                  overwrite: bool = False, max_text_chars: int | None = MAX_TEXT_CHARS,
                  max_sequence_chars: int | None = MAX_SEQUENCE_CHARS, part: tuple[int, int] | None = None,
                  progress: Progress | None = None, early_abort: int = EARLY_ABORT_RECORDS) -> ConvertSummary:
    """JSONL records ``{key, image, turns, caption?, negatives?}`` -> shards; rejects name the line. ``part``,
    ``progress``, ``early_abort`` and resuming: see :func:`muco.convert.pipeline.run_conversion`."""
    opts = _options(image_root, turns, max_side, jpeg_quality, max_text_chars, max_sequence_chars)
    return run_conversion(prepare_line, JsonlSource(str(jsonl), limit), output, opts,
                          max_samples_per_shard=max_samples_per_shard, max_bytes_per_shard=max_bytes_per_shard,
                          workers=workers, manifest=manifest, rejects=rejects, overwrite=overwrite,
                          source=str(jsonl), manifest_extra={"turns": opts.turns}, unit="line", part=part,
                          progress=progress, early_abort=early_abort)


__all__ = ["PARQUET_COLUMNS", "M3TOptions", "check_m3t_lengths", "convert_jsonl", "convert_parquet",
           "prepare_line", "prepare_row", "record_from_line", "record_from_row"]
