"""Convert M3T records into webdataset shards: ``{key}.<jpg|png|webp>`` + ``{key}.json`` (docs/method.md §2.3).

Inputs: (a) the released parquet (``qry`` = per-turn candidate lists, ``pos_text``, ``qry_image_path``,
``qry_sentence``), read in row batches so the 1.95 GB table never sits in RAM (pitfall 11); (b) a JSONL of
records in the project schema with ``image`` relative to ``--image-root``. A process pool reads, validates and
re-encodes (spawned: scripts calling the library with ``workers > 0`` need an ``if __name__ == "__main__"``
guard); one writer keeps the output order deterministic. Bad records (also JSONL lines that are not UTF-8 or
not JSON, and texts over the length limits ``--max-text-chars`` / ``--max-sequence-chars``) are skipped, counted
and listed in a rejects JSONL with their row or line number.

An earlier conversion at the same place is replaced only with ``overwrite``: its manifest is removed first, then
every shard of the pattern, and the new manifest is written atomically last, so a conversion that is killed
leaves no manifest (training refuses to start) rather than one that lists the wrong samples. The workers stop
with the converter: on SIGTERM/SIGINT it terminates them, and a worker whose parent dies (even by SIGKILL) exits.
Usage: ``python -m muco.convert.pipeline M3T.parquet --image-root imgs --output out/train-%06d.tar``.
Fine-tuning pairs (``--kind pairs``) go through the same framework, see ``muco.convert.pairs``.
"""

from __future__ import annotations

import contextlib
import io
import json
import multiprocessing as mp
import os
import re
import signal
import sys
import threading
import time
from collections import Counter, deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ProcessPoolExecutor
from dataclasses import dataclass, field
from itertools import islice
from pathlib import Path
from typing import Any

from PIL import Image

from muco.data.m3t.records import M3T_TASKS, M3TRecord, turns_from_lists
from muco.data.records import MAX_SEQUENCE_CHARS, MAX_TEXT_CHARS, RecordError
from muco.data.shards import MANIFEST_NAME, ShardWriter, write_manifest
from muco.inputs.image_policy import to_rgb

# neg_text and pos_sentence are unused in pretraining (docs/method.md §2.2), so they are never read
PARQUET_COLUMNS = ("qry", "pos_text", "qry_image_path", "qry_sentence")
KEEP_FORMATS = {"JPEG": "jpg", "MPO": "jpg", "PNG": "png", "WEBP": "webp"}  # stored as is; others -> JPEG
CHUNK = 32  # items per pool task: amortises pickling without holding many rows in flight


@dataclass(frozen=True)
class ConvertOptions:
    image_root: str
    turns: int | None = 7
    max_side: int | None = None
    jpeg_quality: int = 90
    max_text_chars: int | None = MAX_TEXT_CHARS  # None: no limit
    max_sequence_chars: int | None = MAX_SEQUENCE_CHARS


@dataclass
class ConvertSummary:
    written: int = 0
    rejected: int = 0
    shards: list[dict] = field(default_factory=list)
    reasons: Counter = field(default_factory=Counter)
    manifest: str = ""
    rejects: str = ""
    first_reject: str = ""

    def __str__(self) -> str:
        why = ", ".join(f"{k}={v}" for k, v in self.reasons.most_common()) or "none"
        first = self.first_reject if len(self.first_reject) <= 160 else self.first_reject[:157] + "..."
        return (f"wrote {self.written} samples into {len(self.shards)} shards; rejected {self.rejected} "
                f"({why}{'; first: ' + first if first else ''}); manifest: {self.manifest}; "
                f"rejects: {self.rejects}")


class Interrupted(BaseException):
    """SIGTERM / SIGHUP during a conversion (SIGINT raises KeyboardInterrupt). Not an Exception, so nothing on
    the way up swallows it; the pool is terminated and the open shard removed on the way out."""

    def __init__(self, signum: int) -> None:
        self.signum = signum
        self.name = signal.Signals(signum).name
        super().__init__(f"interrupted by {self.name}")


class LineError(ValueError):
    """A JSONL line that is not a record at all: undecodable bytes, not JSON, not a JSON object."""

    def __init__(self, reason: str, message: str, key: str | None = None) -> None:
        self.reason, self.key = reason, key
        super().__init__(message)


def parse_line(payload: str | bytes, key: str | None = None) -> dict[str, Any]:
    """One JSONL line as a dict; bytes are lines that did not decode as UTF-8 (see ``_jsonl_items``)."""
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


def check_text_length(key: str, name: str, text: str, limit: int | None) -> None:
    if limit and len(text) > limit:
        raise RecordError(key, name, f"has {len(text):,} characters, over the limit of {limit:,} (--max-text-chars); "
                          "shorten it or raise the limit (0: none)", "too_long")


def check_sequence_length(key: str, name: str, chars: int, limit: int | None, what: str) -> None:
    if limit and chars > limit:
        raise RecordError(key, name, f"has {chars:,} characters of text ({what}), over the limit of {limit:,} "
                          "(--max-sequence-chars); shorten the record or raise the limit (0: none)", "too_long")


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
                out = to_rgb(im).resize(size, Image.Resampling.LANCZOS)
            else:
                im.load()  # a full decode catches truncated files that Image.open accepts
                if ext is not None:
                    return ext, data
                out = to_rgb(im)
    except ImageError:
        raise
    except Exception as e:  # Pillow raises many kinds (OSError, ValueError, SyntaxError, struct.error, ...)
        raise ImageError("bad_image", f"image {path} is unreadable ({type(e).__name__}: {e})") from None
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


def _record_from_line(line: str | bytes) -> tuple[M3TRecord, Any]:
    obj = parse_line(line)
    if not isinstance(obj.get("key"), str):
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
        check_m3t_lengths(record, opts.max_text_chars, opts.max_sequence_chars)
        ext, data = load_image(opts.image_root, image_rel, opts.max_side, opts.jpeg_quality)
    except (RecordError, ImageError, LineError) as e:
        return ("bad", getattr(e, "key", None) or key, index, e.reason, str(e))
    return ("ok", key, [(ext, data), ("json", record.to_json_bytes())])


def _prepare_chunk(kind: str | Callable, items: list[tuple[int, Any, str | None]], opts: ConvertOptions) -> list:
    if callable(kind):  # another record kind's preparer (module-level: spawned workers import it by name)
        return [kind(i, p, k, opts) for i, p, k in items]
    return [prepare_item(kind, i, p, k, opts) for i, p, k in items]


def _chunks(items: Iterable[tuple[int, Any, str | None]]) -> Iterator[list]:
    it = iter(items)
    return iter(lambda: list(islice(it, CHUNK)), [])


def _watch_parent(parent: int) -> None:
    while os.getppid() == parent:
        time.sleep(1.0)
    os._exit(1)


def _worker_init(parent: int) -> None:
    """First thing in every pool worker: exit when the converter dies, whatever kills it (SIGKILL included), and
    leave Ctrl-C to the converter, which stops the pool itself."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    armed = False
    if sys.platform.startswith("linux"):
        try:
            import ctypes

            libc = ctypes.CDLL(None, use_errno=True)
            armed = libc.prctl(1, signal.SIGKILL, 0, 0, 0) == 0  # PR_SET_PDEATHSIG: killed when the parent dies
        except (OSError, AttributeError):
            pass
    if os.getppid() != parent:  # the parent died before the death signal was armed
        os._exit(1)
    if not armed:
        threading.Thread(target=_watch_parent, args=(parent,), name="muco-parent-watch", daemon=True).start()


def _stop_pool(pool: ProcessPoolExecutor) -> None:
    """Terminate the workers now (a worker may be blocked on a slow or hung read); don't wait for their tasks."""
    procs = list((getattr(pool, "_processes", None) or {}).values())
    for p in procs:
        with contextlib.suppress(Exception):
            p.terminate()
    pool.shutdown(wait=False, cancel_futures=True)
    for p in procs:
        with contextlib.suppress(Exception):
            p.join(2)
            if p.is_alive():
                p.kill()
                p.join(1)


def _results(kind: str | Callable, items: Iterable, opts: ConvertOptions, workers: int) -> Iterator[tuple]:
    """(index, prepared item) in input order; at most 2 chunks per worker in flight (bounded memory). Closing the
    generator, or any exception (a signal included), stops the workers."""
    if workers <= 0:
        for chunk in _chunks(items):
            yield from zip([i for i, _, _ in chunk], _prepare_chunk(kind, chunk, opts))
        return
    # spawn, not fork: pyarrow's reader threads make forking this process unsafe
    pool = ProcessPoolExecutor(workers, mp_context=mp.get_context("spawn"), initializer=_worker_init,
                               initargs=(os.getpid(),))
    try:
        pending: deque[tuple[list[int], Future]] = deque()
        for chunk in _chunks(items):
            pending.append(([i for i, _, _ in chunk], pool.submit(_prepare_chunk, kind, chunk, opts)))
            if len(pending) >= 2 * workers:
                indexes, fut = pending.popleft()
                yield from zip(indexes, fut.result())
        while pending:
            indexes, fut = pending.popleft()
            yield from zip(indexes, fut.result())
    except BaseException:  # also GeneratorExit (the writer failed) and Interrupted / KeyboardInterrupt
        _stop_pool(pool)
        raise
    pool.shutdown()


@contextlib.contextmanager
def _signals_raise() -> Iterator[None]:
    """SIGTERM / SIGHUP raise :class:`Interrupted` in the main thread while converting (SIGINT already raises
    KeyboardInterrupt), so that the writer and the pool clean up instead of the process vanishing mid-shard."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum: int, frame: Any) -> None:
        raise Interrupted(signum)

    sigs = [getattr(signal, n) for n in ("SIGTERM", "SIGHUP") if hasattr(signal, n)]
    old = {s: signal.signal(s, handler) for s in sigs}
    # SIGINT raises KeyboardInterrupt even where the process inherited it ignored (a background job)
    old[signal.SIGINT] = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        yield
    finally:
        for s, h in old.items():
            signal.signal(s, h if h is not None else signal.SIG_DFL)


def _run(kind: str | Callable, items: Iterable, output: str, opts: ConvertOptions, *, max_samples_per_shard: int,
         max_bytes_per_shard: int, workers: int, manifest: str | None, rejects: str | None, overwrite: bool,
         source: str, manifest_extra: dict | None = None, unit: str = "row") -> ConvertSummary:
    """Shared by every record kind: ``kind`` is "parquet" | "jsonl" (M3T) or a preparer
    ``f(index, payload, key, opts) -> ("ok", key, members) | ("bad", key, index, reason, message)``; ``unit`` names
    the index in rejects and messages ("row" of a parquet, "line" of a JSONL)."""
    if max_samples_per_shard < 1 or max_bytes_per_shard < 1:
        raise ValueError("--max-samples-per-shard and --max-bytes-per-shard must be >= 1")
    for name in ("max_text_chars", "max_sequence_chars"):
        if (getattr(opts, name) or 0) < 0:
            raise ValueError(f"--{name.replace('_', '-')} must be >= 0 (0: no limit)")
    if not os.path.isdir(opts.image_root):
        raise FileNotFoundError(f"image root {opts.image_root} is not a directory; fix --image-root")
    out_dir = Path(output).parent
    summary = ConvertSummary(manifest=str(manifest or out_dir / MANIFEST_NAME),
                             rejects=str(rejects or out_dir / "rejects.jsonl"))
    with _signals_raise():
        _replace_outputs(output, Path(summary.manifest), overwrite)
        out_dir.mkdir(parents=True, exist_ok=True)
        seen: set[str] = set()
        with ShardWriter(output, max_samples_per_shard, max_bytes_per_shard) as writer, \
                open(summary.rejects, "w", encoding="utf-8") as rej, \
                contextlib.closing(_results(kind, items, opts, workers)) as results:
            for index, res in results:
                if res[0] == "ok" and res[1] in seen:
                    res = ("bad", res[1], index, "duplicate_key", f"record {res[1]!r}: key already written")
                if res[0] == "bad":
                    _, key, index, reason, message = res
                    if unit != "row" and index is not None:
                        message = f"{unit} {index}: {message}"
                    rej.write(json.dumps({"key": key, unit: index, "reason": reason, "message": message}) + "\n")
                    summary.rejected += 1
                    summary.reasons[reason] += 1
                    summary.first_reject = summary.first_reject or message
                    continue
                if kind != "parquet":  # M3T parquet keys are unique by construction (row numbers)
                    seen.add(res[1])
                writer.write(res[1], res[2])
                summary.written += 1
        summary.shards = writer.shards
        write_manifest(summary.manifest, summary.shards, **(manifest_extra or {"turns": opts.turns}), source=source,
                       rejected=summary.rejected, max_text_chars=opts.max_text_chars,
                       max_sequence_chars=opts.max_sequence_chars)
    return summary


def _pattern_files(pattern: str) -> list[Path]:
    """Every existing shard of ``pattern`` and leftover ``.tmp``, at any index (also past a gap in the numbering)."""
    if "%" not in pattern:
        raise ValueError(f"output pattern {pattern!r} needs a %-index, e.g. out/train-%06d.tar")
    directory, name = Path(pattern).parent, Path(pattern).name
    spec = re.search(r"%0?\d*d", name)
    if "%" in str(directory) or spec is None or not directory.is_dir():
        found, i = [], 0  # an unusual pattern: the shards the writer numbers 0, 1, ... until one is missing
        while os.path.exists(pattern % i) or os.path.exists(pattern % i + ".tmp"):
            found += [Path(p) for p in (pattern % i, pattern % i + ".tmp") if os.path.exists(p)]
            i += 1
        return found
    rx = re.compile(re.escape(name[:spec.start()]) + r"(\d+)" + re.escape(name[spec.end():]) + r"(\.tmp)?")
    found = []
    for entry in sorted(os.listdir(directory)):
        m = rx.fullmatch(entry)
        if m and Path(pattern % int(m.group(1))) == directory / entry.removesuffix(".tmp"):
            found.append(directory / entry)
    return found


def _stale_manifests(manifest: Path, pattern: str, shards: list[Path]) -> list[Path]:
    """The manifest about to be written, and a manifest at the default place that lists any of ``shards``."""
    out = [manifest] if manifest.exists() else []
    default = Path(pattern).parent / MANIFEST_NAME
    if default.exists() and default.resolve() != manifest.resolve():
        ours = {p.resolve() for p in shards} | {Path(pattern % 0).resolve()}
        try:
            listed = {(default.parent / s["name"]).resolve() for s in json.loads(default.read_text())["shards"]}
        except (OSError, ValueError, KeyError, TypeError):
            listed = set()
        if listed & ours:
            out.append(default)
    return out


def _fsync_dir(directory: Path) -> None:
    with contextlib.suppress(OSError):
        fd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _replace_outputs(pattern: str, manifest: Path, overwrite: bool) -> None:
    """Refuse an earlier conversion's output without ``overwrite``; with it, invalidate that conversion first (its
    manifest goes, atomically, before any shard is touched) and then remove all of its shards, so that an
    interruption from here on leaves no manifest that lists stale or missing shards."""
    shards = _pattern_files(pattern)
    manifests = _stale_manifests(manifest, pattern, shards)
    existing = shards + manifests
    if existing and not overwrite:
        raise FileExistsError(f"{existing[0]} exists (an earlier conversion); pass --overwrite to replace it, "
                              "or choose another --output / --manifest")
    for m in manifests:
        m.unlink(missing_ok=True)
        _fsync_dir(m.parent)
    manifest.with_name(manifest.name + ".tmp").unlink(missing_ok=True)
    for p in shards:
        p.unlink(missing_ok=True)


def _parquet_items(paths: list[str], key_prefix: str | None, batch_rows: int, limit: int | None,
                   wanted: tuple[str, ...] = PARQUET_COLUMNS, optional: tuple[str, ...] = ("qry_sentence",),
                   stem_parts: int = 1) -> Iterator:
    """(row, row dict, key) of the ``wanted`` columns; keys are ``<prefix><row:09d>``, the default prefix made of
    the last ``stem_parts`` path components (directory names, then the file stem). Every file's schema is checked
    now: a wrong input fails before an earlier conversion is replaced."""
    import pyarrow.parquet as pq

    files = []
    for path in paths:
        if not os.path.isfile(path):
            raise FileNotFoundError(f"input {path} does not exist or is not a file; fix the path")
        pf = pq.ParquetFile(path)
        names = set(pf.schema_arrow.names)
        missing = [c for c in wanted if c not in names and c not in optional]
        if missing:
            raise ValueError(f"{path}: missing columns {missing}; found {sorted(names)}")
        files.append((path, pf, [c for c in wanted if c in names]))

    def rows() -> Iterator:
        n = 0
        for path, pf, columns in files:
            prefix = key_prefix
            if prefix is None:
                parts = Path(path).with_suffix("").parts[-stem_parts:]
                prefix = re.sub(r"[^A-Za-z0-9_-]", "_", "_".join(parts)) + "_"
            row = 0
            for batch in pf.iter_batches(batch_size=batch_rows, columns=columns):
                for r in batch.to_pylist():
                    if limit is not None and n >= limit:
                        return
                    yield row, r, f"{prefix}{row:09d}"
                    row += 1
                    n += 1

    return rows()


def _jsonl_items(path: str, limit: int | None) -> Iterator:
    """(line number, line, None) of the non-blank lines; a line that is not UTF-8 stays bytes (the preparer
    rejects it, naming the line) instead of ending the whole conversion. Opens the file now: a wrong path fails
    before an earlier conversion is replaced."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"input {path} does not exist or is not a file; fix the path")
    f = open(path, "rb")  # noqa: SIM115 -- closed by the generator

    def lines() -> Iterator:
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


def convert_parquet(parquet: str | os.PathLike | list, image_root: str | os.PathLike, output: str, *,
                    turns: int | None = 7, max_side: int | None = None, jpeg_quality: int = 90,
                    max_samples_per_shard: int = 1000, max_bytes_per_shard: int = 1 << 30, workers: int = 0,
                    manifest: str | None = None, rejects: str | None = None, key_prefix: str | None = None,
                    batch_rows: int = 1024, limit: int | None = None, overwrite: bool = False,
                    max_text_chars: int | None = MAX_TEXT_CHARS,
                    max_sequence_chars: int | None = MAX_SEQUENCE_CHARS) -> ConvertSummary:
    """Released M3T parquet(s) -> shards. Keys are ``<file stem>_<row:09d>`` unless ``key_prefix`` is set.
    ``max_text_chars`` / ``max_sequence_chars``: length limits (0 or None: none), see ``check_m3t_lengths``."""
    paths = [str(p) for p in (parquet if isinstance(parquet, list) else [parquet])]
    opts = ConvertOptions(str(image_root), turns, max_side, jpeg_quality, max_text_chars or None,
                          max_sequence_chars or None)
    items = _parquet_items(paths, key_prefix, batch_rows, limit)
    return _run("parquet", items, output, opts, max_samples_per_shard=max_samples_per_shard,
                max_bytes_per_shard=max_bytes_per_shard, workers=workers, manifest=manifest, rejects=rejects,
                overwrite=overwrite, source=",".join(paths))


def convert_jsonl(jsonl: str | os.PathLike, image_root: str | os.PathLike, output: str, *,
                  turns: int | None = 7, max_side: int | None = None, jpeg_quality: int = 90,
                  max_samples_per_shard: int = 1000, max_bytes_per_shard: int = 1 << 30, workers: int = 0,
                  manifest: str | None = None, rejects: str | None = None, limit: int | None = None,
                  overwrite: bool = False, max_text_chars: int | None = MAX_TEXT_CHARS,
                  max_sequence_chars: int | None = MAX_SEQUENCE_CHARS) -> ConvertSummary:
    """JSONL records ``{key, image, turns, caption?, negatives?}`` -> shards; rejects name the line."""
    opts = ConvertOptions(str(image_root), turns, max_side, jpeg_quality, max_text_chars or None,
                          max_sequence_chars or None)
    return _run("jsonl", _jsonl_items(str(jsonl), limit), output, opts,
                max_samples_per_shard=max_samples_per_shard, max_bytes_per_shard=max_bytes_per_shard,
                workers=workers, manifest=manifest, rejects=rejects, overwrite=overwrite, source=str(jsonl),
                unit="line")


if __name__ == "__main__":  # `python -m muco.convert.pipeline ...` keeps working
    from muco.cli.convert import main

    raise SystemExit(main())
