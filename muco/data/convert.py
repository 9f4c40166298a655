"""Convert M3T records into webdataset shards: ``{key}.<jpg|png|webp>`` + ``{key}.json`` (METHOD.md §2.3).

Inputs: (a) the released parquet (``qry`` = per-turn candidate lists, ``pos_text``, ``qry_image_path``,
``qry_sentence``), read in row batches so the 1.95 GB table never sits in RAM (pitfall 11); (b) a JSONL of
records in the project schema with ``image`` relative to ``--image-root``. A process pool reads, validates and
re-encodes (spawned: scripts calling the library with ``workers > 0`` need an ``if __name__ == "__main__"``
guard); one writer keeps the output order deterministic. Bad records are skipped, counted and listed in a
rejects JSONL.
Usage: ``python -m muco.data.convert M3T.parquet --image-root imgs --output out/train-%06d.tar``.
Fine-tuning pairs (``--kind pairs``) go through the same framework, see ``muco.data.pair_convert``.
"""

from __future__ import annotations

import io
import json
import multiprocessing as mp
import os
import re
from collections import Counter, deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ProcessPoolExecutor
from dataclasses import dataclass, field
from itertools import islice
from pathlib import Path
from typing import Any

from PIL import Image

from muco.data.records import M3T_TASKS, M3TRecord, RecordError, turns_from_lists
from muco.data.shards import MANIFEST_NAME, ShardWriter, write_manifest

# neg_text and pos_sentence are unused in pretraining (METHOD.md §2.2), so they are never read
PARQUET_COLUMNS = ("qry", "pos_text", "qry_image_path", "qry_sentence")
KEEP_FORMATS = {"JPEG": "jpg", "MPO": "jpg", "PNG": "png", "WEBP": "webp"}  # stored as is; others -> JPEG
CHUNK = 32  # items per pool task: amortises pickling without holding many rows in flight


@dataclass(frozen=True)
class ConvertOptions:
    image_root: str
    turns: int | None = 7
    max_side: int | None = None
    jpeg_quality: int = 90


@dataclass
class ConvertSummary:
    written: int = 0
    rejected: int = 0
    shards: list[dict] = field(default_factory=list)
    reasons: Counter = field(default_factory=Counter)
    manifest: str = ""
    rejects: str = ""

    def __str__(self) -> str:
        why = ", ".join(f"{k}={v}" for k, v in self.reasons.most_common()) or "none"
        return (f"wrote {self.written} samples into {len(self.shards)} shards; rejected {self.rejected} "
                f"({why}); manifest: {self.manifest}; rejects: {self.rejects}")


class ImageError(ValueError):
    def __init__(self, reason: str, message: str) -> None:
        self.reason = reason
        super().__init__(message)


def load_image(root: str, rel: Any, max_side: int | None, quality: int) -> tuple[str, bytes]:
    """(extension, bytes) of a fully decodable image; re-encoded as JPEG only when resized or exotic."""
    if not isinstance(rel, str) or not rel:
        raise ImageError("missing_image", "has no image path")
    if os.path.isabs(rel) or ".." in Path(rel).parts:
        raise ImageError("bad_path", f"image path {rel!r} must stay inside the image root")
    path = os.path.join(root, rel)
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError as e:
        raise ImageError("missing_image", f"image {path} cannot be read ({e.strerror or e})") from None
    try:
        with Image.open(io.BytesIO(data)) as im:
            w, h = im.size
            if max(w, h) > 200 * min(w, h):  # Qwen2-VL's processor refuses such aspect ratios
                raise ImageError("bad_image", f"image {path} has aspect ratio {w}x{h} > 200")
            ext = KEEP_FORMATS.get(im.format or "")
            if max_side and max(w, h) > max_side:
                s = max_side / max(w, h)
                size = (max(1, round(w * s)), max(1, round(h * s)))
                im.draft("RGB", size)  # JPEG: decode at a reduced DCT scale, >= size
                out = im.convert("RGB").resize(size, Image.Resampling.LANCZOS)
            else:
                im.load()  # a full decode catches truncated files that Image.open accepts
                if ext is not None:
                    return ext, data
                out = im.convert("RGB")
    except ImageError:
        raise
    except (OSError, ValueError, Image.DecompressionBombError) as e:
        raise ImageError("bad_image", f"image {path} is unreadable ({e})") from None
    buf = io.BytesIO()
    out.save(buf, format="JPEG", quality=quality)
    return "jpg", buf.getvalue()


def _record_from_row(key: str, row: dict[str, Any]) -> tuple[M3TRecord, Any]:
    qry, pos = row.get("qry"), row.get("pos_text")
    tasks = M3T_TASKS if isinstance(qry, list) and len(qry) == len(M3T_TASKS) else ()
    turns = turns_from_lists(key, qry, pos, tasks)  # type: ignore[arg-type]
    caption = row.get("qry_sentence")
    caption = caption if isinstance(caption, str) and caption.strip() else None  # unused in pretraining
    return M3TRecord(key=key, image=None, turns=turns, caption=caption), row.get("qry_image_path")


def _record_from_line(line: str) -> tuple[M3TRecord, Any]:
    try:
        obj = json.loads(line)
    except json.JSONDecodeError as e:
        raise RecordError(None, "line", f"is not valid JSON ({e})", "json") from None
    if not isinstance(obj, dict) or not isinstance(obj.get("key"), str):
        raise RecordError(None, "key", "is missing (each line needs a string 'key')", "key")
    key = obj.pop("key")
    image = obj.pop("image", None)
    return M3TRecord.from_json(key, obj), image


def prepare_item(kind: str, index: int, payload: Any, key: str | None, opts: ConvertOptions) -> tuple:
    """One input item -> ("ok", key, members) or ("bad", key, index, reason, message); runs in workers."""
    try:
        if kind == "parquet":
            record, image_rel = _record_from_row(key, payload)  # type: ignore[arg-type]
        else:
            record, image_rel = _record_from_line(payload)
        key = record.key
        record.validate(opts.turns)
        ext, data = load_image(opts.image_root, image_rel, opts.max_side, opts.jpeg_quality)
    except (RecordError, ImageError) as e:
        return ("bad", getattr(e, "key", None) or key, index, e.reason, str(e))
    return ("ok", key, [(ext, data), ("json", record.to_json_bytes())])


def _prepare_chunk(kind: str | Callable, items: list[tuple[int, Any, str | None]], opts: ConvertOptions) -> list:
    if callable(kind):  # another record kind's preparer (module-level: spawned workers import it by name)
        return [kind(i, p, k, opts) for i, p, k in items]
    return [prepare_item(kind, i, p, k, opts) for i, p, k in items]


def _chunks(items: Iterable[tuple[int, Any, str | None]]) -> Iterator[list]:
    it = iter(items)
    return iter(lambda: list(islice(it, CHUNK)), [])


def _results(kind: str | Callable, items: Iterable, opts: ConvertOptions, workers: int) -> Iterator[tuple]:
    """Prepared items in input order; at most 2 chunks per worker in flight (bounded memory)."""
    if workers <= 0:
        for chunk in _chunks(items):
            yield from _prepare_chunk(kind, chunk, opts)
        return
    # spawn, not fork: pyarrow's reader threads make forking this process unsafe
    with ProcessPoolExecutor(workers, mp_context=mp.get_context("spawn")) as pool:
        pending: deque[Future] = deque()
        for chunk in _chunks(items):
            pending.append(pool.submit(_prepare_chunk, kind, chunk, opts))
            if len(pending) >= 2 * workers:
                yield from pending.popleft().result()
        while pending:
            yield from pending.popleft().result()


def _run(kind: str | Callable, items: Iterable, output: str, opts: ConvertOptions, *, max_samples_per_shard: int,
         max_bytes_per_shard: int, workers: int, manifest: str | None, rejects: str | None, overwrite: bool,
         source: str, manifest_extra: dict | None = None) -> ConvertSummary:
    """Shared by every record kind: ``kind`` is "parquet" | "jsonl" (M3T) or a preparer
    ``f(index, payload, key, opts) -> ("ok", key, members) | ("bad", key, index, reason, message)``."""
    out_dir = Path(output).parent
    summary = ConvertSummary(manifest=str(manifest or out_dir / MANIFEST_NAME),
                             rejects=str(rejects or out_dir / "rejects.jsonl"))
    _clear_outputs(output, overwrite)
    out_dir.mkdir(parents=True, exist_ok=True)
    seen: set[str] = set()
    with ShardWriter(output, max_samples_per_shard, max_bytes_per_shard) as writer, \
            open(summary.rejects, "w", encoding="utf-8") as rej:
        for res in _results(kind, items, opts, workers):
            if res[0] == "ok" and res[1] in seen:
                res = ("bad", res[1], None, "duplicate_key", f"record {res[1]!r}: key already written")
            if res[0] == "bad":
                _, key, index, reason, message = res
                rej.write(json.dumps({"key": key, "row": index, "reason": reason, "message": message}) + "\n")
                summary.rejected += 1
                summary.reasons[reason] += 1
                continue
            if kind != "parquet":  # M3T parquet keys are unique by construction (row numbers)
                seen.add(res[1])
            writer.write(res[1], res[2])
            summary.written += 1
    summary.shards = writer.shards
    write_manifest(summary.manifest, summary.shards, **(manifest_extra or {"turns": opts.turns}), source=source,
                   rejected=summary.rejected)
    return summary


def _clear_outputs(pattern: str, overwrite: bool) -> None:
    if "%" not in pattern:
        raise ValueError(f"output pattern {pattern!r} needs a %-index, e.g. out/train-%06d.tar")
    i = 0
    while os.path.exists(pattern % i) or os.path.exists(pattern % i + ".tmp"):
        if not overwrite:
            raise FileExistsError(f"{pattern % i} exists; pass --overwrite or choose another --output")
        for p in (pattern % i, pattern % i + ".tmp"):
            Path(p).unlink(missing_ok=True)
        i += 1


def _parquet_items(paths: list[str], key_prefix: str | None, batch_rows: int, limit: int | None,
                   wanted: tuple[str, ...] = PARQUET_COLUMNS, optional: tuple[str, ...] = ("qry_sentence",),
                   stem_parts: int = 1) -> Iterator:
    """(row, row dict, key) of the ``wanted`` columns; keys are ``<prefix><row:09d>``, the default prefix made of
    the last ``stem_parts`` path components (directory names, then the file stem)."""
    import pyarrow.parquet as pq

    n = 0
    for path in paths:
        pf = pq.ParquetFile(path)
        names = set(pf.schema_arrow.names)
        missing = [c for c in wanted if c not in names and c not in optional]
        if missing:
            raise ValueError(f"{path}: missing columns {missing}; found {sorted(names)}")
        prefix = key_prefix
        if prefix is None:
            parts = Path(path).with_suffix("").parts[-stem_parts:]
            prefix = re.sub(r"[^A-Za-z0-9_-]", "_", "_".join(parts)) + "_"
        columns = [c for c in wanted if c in names]
        row = 0
        for batch in pf.iter_batches(batch_size=batch_rows, columns=columns):
            for r in batch.to_pylist():
                if limit is not None and n >= limit:
                    return
                yield row, r, f"{prefix}{row:09d}"
                row += 1
                n += 1


def _jsonl_items(path: str, limit: int | None) -> Iterator:
    with open(path, encoding="utf-8") as f:
        n = 0
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            if limit is not None and n >= limit:
                return
            yield lineno, line, None
            n += 1


def convert_parquet(parquet: str | os.PathLike | list, image_root: str | os.PathLike, output: str, *,
                    turns: int | None = 7, max_side: int | None = None, jpeg_quality: int = 90,
                    max_samples_per_shard: int = 1000, max_bytes_per_shard: int = 1 << 30, workers: int = 0,
                    manifest: str | None = None, rejects: str | None = None, key_prefix: str | None = None,
                    batch_rows: int = 1024, limit: int | None = None,
                    overwrite: bool = False) -> ConvertSummary:
    """Released M3T parquet(s) -> shards. Keys are ``<file stem>_<row:09d>`` unless ``key_prefix`` is set."""
    paths = [str(p) for p in (parquet if isinstance(parquet, list) else [parquet])]
    opts = ConvertOptions(str(image_root), turns, max_side, jpeg_quality)
    items = _parquet_items(paths, key_prefix, batch_rows, limit)
    return _run("parquet", items, output, opts, max_samples_per_shard=max_samples_per_shard,
                max_bytes_per_shard=max_bytes_per_shard, workers=workers, manifest=manifest, rejects=rejects,
                overwrite=overwrite, source=",".join(paths))


def convert_jsonl(jsonl: str | os.PathLike, image_root: str | os.PathLike, output: str, *,
                  turns: int | None = 7, max_side: int | None = None, jpeg_quality: int = 90,
                  max_samples_per_shard: int = 1000, max_bytes_per_shard: int = 1 << 30, workers: int = 0,
                  manifest: str | None = None, rejects: str | None = None, limit: int | None = None,
                  overwrite: bool = False) -> ConvertSummary:
    """JSONL records ``{key, image, turns, caption?, negatives?}`` -> shards; rejects name the line."""
    opts = ConvertOptions(str(image_root), turns, max_side, jpeg_quality)
    return _run("jsonl", _jsonl_items(str(jsonl), limit), output, opts,
                max_samples_per_shard=max_samples_per_shard, max_bytes_per_shard=max_bytes_per_shard,
                workers=workers, manifest=manifest, rejects=rejects, overwrite=overwrite, source=str(jsonl))


if __name__ == "__main__":  # `python -m muco.data.convert ...` keeps working
    from muco.data.convert_cli import main

    raise SystemExit(main())
