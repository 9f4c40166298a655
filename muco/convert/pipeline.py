"""The conversion pipeline every record kind shares: input items -> webdataset shards + rejects + manifest.

A record kind supplies a *preparer* ``prepare(index, payload, key, opts)`` that turns one input item into
:func:`prepared` ``(key, members)`` or :func:`rejected` (the reason and message of a bad record); see
``muco.convert.m3t`` and ``muco.convert.pairs``. :func:`run_conversion` runs the preparer over the items, in a
process pool when ``workers > 0`` (spawned, so the preparer must be a module-level function or another picklable
object, and scripts calling the library with workers need an ``if __name__ == "__main__"`` guard), and one writer
keeps the output in input order, whatever the number of workers. Bad records are skipped, counted and listed in
a rejects JSONL with their row or line number.

A conversion is resumable: a journal next to the shards records every finished shard (size, sha256, the input
position after it, the rejects so far), and re-running the same command verifies those shards and continues
after the last one, to output byte-identical to an uninterrupted run; different settings are refused. ``part``
converts one of N contiguous ranges of the input, with its own shards, rejects and part manifest, for
``muco.convert.parts.merge_parts`` to join (see :mod:`muco.convert.parts` for the files and the journal).
``overwrite`` starts over instead: the manifest is removed first, then every shard of the pattern, and the new
manifest is written atomically last, so a conversion that is killed leaves no manifest (training refuses to
start) rather than one that lists the wrong samples. When the first :data:`EARLY_ABORT_RECORDS` records all
miss their image, the image root is wrong: the conversion stops at once (:class:`ImageRootError`).

The workers stop with the converter: on SIGTERM/SIGHUP it raises :class:`Interrupted` (SIGINT:
``KeyboardInterrupt``) and terminates them, and a worker whose parent dies (even by SIGKILL) exits.
"""

from __future__ import annotations

import contextlib
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
from dataclasses import asdict, dataclass, field, is_dataclass
from datetime import timedelta
from itertools import islice
from pathlib import Path
from typing import Any, TextIO

from muco.convert.parts import (
    Checkpoint,
    Journal,
    ShardSink,
    fsync_dir,
    journal_path,
    manifest_fields,
    part_path,
    part_pattern,
    part_range,
    pattern_files,
    settings_diff,
    shard_keys,
    stale_manifests,
    summary_line,
)
from muco.convert.sources import IterableSource, Source, is_source
from muco.data.records import MAX_SEQUENCE_CHARS, MAX_TEXT_CHARS
from muco.data.shards import MANIFEST_NAME, write_manifest

_ADDRESS = re.compile(r" object at 0x[0-9a-fA-F]+>")
CHUNK = 32  # items per pool task: amortises pickling without holding many rows in flight
EARLY_ABORT_RECORDS = 50  # the first this many records all missing their image: the image root is wrong
PROGRESS_EVERY_S = 30.0  # seconds between progress log lines when stderr is not a terminal


@dataclass(frozen=True)
class ConvertOptions:
    """What every record kind needs in its workers; kinds add their own fields in a subclass."""

    image_root: str
    max_side: int | None = None
    jpeg_quality: int = 90
    max_text_chars: int | None = MAX_TEXT_CHARS  # None: no limit
    max_sequence_chars: int | None = MAX_SEQUENCE_CHARS


@dataclass
class ConvertSummary:
    """What a conversion (or one part of it) wrote; ``resumed_shards`` were kept from an earlier run of the same
    command, and ``already_complete`` says that run had finished (nothing was re-written)."""

    written: int = 0
    rejected: int = 0
    shards: list[dict] = field(default_factory=list)
    reasons: Counter = field(default_factory=Counter)
    manifest: str = ""
    rejects: str = ""
    first_reject: str = ""
    part: tuple[int, int] | None = None
    items: int = 0  # input items in this conversion's range (this part's), once known
    resumed_shards: int = 0
    already_complete: bool = False
    journal: str = ""

    def __str__(self) -> str:
        text = summary_line(self.written, len(self.shards), self.rejected, self.reasons, self.first_reject,
                            self.manifest, self.rejects)
        if self.part is not None:
            text = f"part {self.part[0]}/{self.part[1]}: {text}"
        if self.already_complete:
            text += " (already complete: verified, nothing re-written)"
        elif self.resumed_shards:
            text += f" (resumed after {self.resumed_shards} verified shards)"
        return text


class ImageRootError(ValueError):
    """The first records of a conversion all miss their image: the image root is wrong (not the records)."""


class Progress:
    """A conversion's progress on stderr: a tqdm bar on a terminal (``"bar"``), a log line every ``every``
    seconds otherwise (``"log"``), chosen by ``"auto"``. :meth:`update` is called per item and returns at once
    until the next report is due, so it costs the writer a clock read."""

    def __init__(self, mode: str = "auto", every: float = PROGRESS_EVERY_S, label: str = "muco data convert",
                 stream: TextIO | None = None) -> None:
        self.stream = stream if stream is not None else sys.stderr
        if mode == "auto":
            isatty = getattr(self.stream, "isatty", None)
            mode = "bar" if isatty is not None and isatty() else "log"
        if mode not in ("bar", "log"):
            raise ValueError(f"progress mode {mode!r}: use auto, bar or log")
        self.mode, self.every, self.label = mode, every, label
        self.bar: Any = None
        self.total: int | None = None
        self.unit = "row"
        self.t0 = self.due = 0.0
        self.done0 = self.written0 = 0

    def start(self, total: int | None, done: int, written: int, unit: str = "row",
              part: tuple[int, int] | None = None) -> None:
        """``total`` items in the range (None: unknown), ``done`` of them and ``written`` samples before this run."""
        self.total, self.unit, self.done0, self.written0 = total, unit, done, written
        if part is not None:
            self.label += f" part {part[0]}/{part[1]}"
        self.t0 = time.monotonic()
        self.due = self.t0 + (0.5 if self.mode == "bar" else self.every)
        if done and self.mode == "log":
            print(f"{self.label}: resuming after {done:,} {unit}s (and {written:,} samples) of an earlier run",
                  file=self.stream, flush=True)
        if self.mode == "bar":
            from tqdm import tqdm

            self.bar = tqdm(total=total, initial=done, unit=unit, desc=self.label, file=self.stream,
                            dynamic_ncols=True, smoothing=0.05, mininterval=0.5)

    def update(self, done: int, written: int, rejected: int) -> None:
        now = time.monotonic()
        if now >= self.due:
            self.due = now + (0.5 if self.mode == "bar" else self.every)
            self._report(now, done, written, rejected)

    def close(self, done: int, written: int, rejected: int, finished: bool = True) -> None:
        """The last report (none when the conversion failed: its error is the one line to read)."""
        if finished or self.bar is not None:
            self._report(time.monotonic(), done, written, rejected, final=True)
        if self.bar is not None:
            self.bar.close()
            self.bar = None

    def _report(self, now: float, done: int, written: int, rejected: int, final: bool = False) -> None:
        elapsed = max(now - self.t0, 1e-9)
        rate, good = (done - self.done0) / elapsed, (written - self.written0) / elapsed
        if self.bar is not None:
            self.bar.update(done - self.bar.n)
            self.bar.set_postfix_str(f"{good:,.0f} good samples/s, {rejected:,} rejected", refresh=final)
            return
        of = ""
        if self.total:
            of = f"/{self.total:,} ({100 * done / self.total:.1f}%)"
        eta = ""
        if final:
            eta = f", done in {timedelta(seconds=round(elapsed))}"
        elif self.total is not None and rate > 0:
            eta = f", ETA {timedelta(seconds=round((self.total - done) / rate))}"
        print(f"{self.label}: {done:,}{of} {self.unit}s, {rate:,.1f} {self.unit}s/s, {good:,.1f} good samples/s, "
              f"{written:,} written, {rejected:,} rejected{eta}", file=self.stream, flush=True)


class Interrupted(BaseException):
    """SIGTERM / SIGHUP during a conversion (SIGINT raises KeyboardInterrupt). Not an Exception, so nothing on
    the way up swallows it; the pool is terminated and the open shard removed on the way out."""

    def __init__(self, signum: int) -> None:
        self.signum = signum
        self.name = signal.Signals(signum).name
        super().__init__(f"interrupted by {self.name}")


# A preparer's result: ("ok", key, members) or ("bad", key, index, reason, message); build it with these two.
Prepared = tuple
Preparer = Callable[[int, Any, str | None, Any], Prepared]  # (index, payload, key, opts) -> Prepared


def prepared(key: str, members: list[tuple[str, bytes]]) -> Prepared:
    """A good record: its key and its shard members ``(extension, bytes)``, in the order they are written."""
    return ("ok", key, members)


def rejected(index: int | None, key: str | None, error: Exception) -> Prepared:
    """A bad record: ``error`` carries the ``reason`` (its category in the summary) and the message; the key is
    the error's own when it has one (a line's key is only known once it is parsed)."""
    # an object's address in a library's message (Pillow: "cannot identify image file <_io.BytesIO object at
    # 0x7f..>") differs between runs; rejects must not, or a resumed or merged conversion would differ from one run
    message = _ADDRESS.sub(" object>", str(error))
    return ("bad", getattr(error, "key", None) or key, index, getattr(error, "reason", "error"), message)


def _prepare_chunk(prepare: Preparer, items: list[tuple[int, Any, str | None]], opts: Any) -> list:
    return [prepare(i, p, k, opts) for i, p, k in items]


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


def _results(prepare: Preparer, items: Iterable, opts: Any, workers: int) -> Iterator[tuple]:
    """(index, prepared item) in input order; at most 2 chunks per worker in flight (bounded memory). Closing the
    generator, or any exception (a signal included), stops the workers."""
    if workers <= 0:  # one at a time: nothing to amortise, and an error stops right at its item
        for i, payload, key in items:
            yield i, prepare(i, payload, key, opts)
        return
    # spawn, not fork: pyarrow's reader threads make forking this process unsafe
    pool = ProcessPoolExecutor(workers, mp_context=mp.get_context("spawn"), initializer=_worker_init,
                               initargs=(os.getpid(),))
    try:
        pending: deque[tuple[list[int], Future]] = deque()
        for chunk in _chunks(items):
            pending.append(([i for i, _, _ in chunk], pool.submit(_prepare_chunk, prepare, chunk, opts)))
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


def run_conversion(prepare: Preparer, items: Iterable[tuple[int, Any, str | None]] | Source, output: str,
                   opts: ConvertOptions, *, max_samples_per_shard: int, max_bytes_per_shard: int, workers: int,
                   manifest: str | None, rejects: str | None, overwrite: bool, source: str,
                   manifest_extra: dict | None = None, unit: str = "row", check_duplicates: bool = True,
                   part: tuple[int, int] | None = None, progress: Progress | None = None,
                   early_abort: int = EARLY_ABORT_RECORDS) -> ConvertSummary:
    """Convert ``items`` ``(index, payload, key)`` (a :class:`muco.convert.sources.Source`, or any iterable of
    them) with ``prepare`` into shards ``output % i``, a rejects JSONL and a manifest (default: next to the
    shards). ``unit`` names the index in rejects and messages ("row" of a parquet, "line" of a JSONL);
    ``manifest_extra`` adds the kind's own fields to the manifest; ``check_duplicates=False`` skips the
    duplicate-key check where keys are unique by construction.

    ``part=(I, N)``: convert only the I-th (0-based) of N contiguous ranges of the items, into the part's own
    files (:mod:`muco.convert.parts`). An earlier run of the same conversion is resumed (or, complete, only
    verified); other settings are refused with a ValueError; ``overwrite`` starts over. ``progress`` reports on
    stderr. ``early_abort``: stop with :class:`ImageRootError` when the first that many items (all of them, when
    fewer) all fail with ``missing_image``; 0 turns this off."""
    if max_samples_per_shard < 1 or max_bytes_per_shard < 1:
        raise ValueError("--max-samples-per-shard and --max-bytes-per-shard must be >= 1")
    for name in ("max_text_chars", "max_sequence_chars"):
        if (getattr(opts, name) or 0) < 0:
            raise ValueError(f"--{name.replace('_', '-')} must be >= 0 (0: no limit)")
    if early_abort < 0:
        raise ValueError("--early-abort must be >= 0 (0: off)")
    if not os.path.isdir(opts.image_root):
        raise FileNotFoundError(f"image root {opts.image_root} is not a directory; fix --image-root")
    src: Source = items if is_source(items) else IterableSource(items, unit, source)  # type: ignore[assignment]
    base_manifest = Path(manifest) if manifest else Path(output).parent / MANIFEST_NAME
    base_rejects = Path(rejects) if rejects else Path(output).parent / "rejects.jsonl"
    pattern, manifest_path, rejects_path = output, base_manifest, base_rejects
    if part is not None:
        index, count = part
        if not 0 <= index < count:
            raise ValueError(f"part {index}/{count}: give I/N with 0 <= I < N (I is 0-based)")
        pattern = part_pattern(output, index, count)
        manifest_path, rejects_path = part_path(base_manifest, index, count), part_path(base_rejects, index, count)
    jpath = journal_path(pattern)
    total = src.count() if part is not None else src.known_count()
    start, stop = part_range(total, *part) if part is not None and total is not None else (0, total)
    dataset = {**(manifest_extra or {}), "source": source, "max_text_chars": opts.max_text_chars,
               "max_sequence_chars": opts.max_sequence_chars}
    settings = _settings(output, base_manifest, base_rejects, part, opts, src, dataset, unit, check_duplicates,
                         max_samples_per_shard, max_bytes_per_shard)
    summary = ConvertSummary(manifest=str(manifest_path), rejects=str(rejects_path), part=part, journal=str(jpath),
                             items=0 if stop is None else stop - start)
    with _signals_raise():
        journal, last = _prepare_output(pattern, manifest_path, rejects_path, jpath, settings, start, stop,
                                        overwrite)
        shards = [{**s, "name": str(jpath.parent / s["name"])} for s in journal.shards]
        summary.shards, summary.resumed_shards = shards, len(shards)
        if last is not None:
            summary.written, summary.rejected, summary.first_reject = last.written, last.rejected, last.first_reject
            summary.reasons = Counter(last.reasons)
        if last is not None and last.complete:
            summary.already_complete, summary.items = True, last.next - start
            if not manifest_path.exists():  # removed, or killed between the journal's end and the manifest
                _write_manifest(summary, settings, dataset, start, last, rejects_path)
            return summary
        position = last.next if last is not None else start
        seen: set[str] = set()
        if check_duplicates:  # keys of the shards kept from an earlier run: a later duplicate is still rejected
            for s in shards:
                seen.update(shard_keys(s["name"]))
        sink = ShardSink(pattern, max_samples_per_shard, max_bytes_per_shard, first_index=len(shards))
        watch = early_abort if last is None else 0  # a resumed run got past the first records before
        # a small range of a larger input (a part) may miss its few images by chance: only the whole input's
        # first records, or early_abort of them, tell that the image root is wrong
        whole = start == 0 and (stop is None or stop == total)
        missing, finished = 0, False
        if progress is not None:
            progress.start(None if stop is None else stop - start, position - start, summary.written, unit, part)
        try:
            with open(rejects_path, "ab") as rej, \
                    contextlib.closing(_results(prepare, src.items(position, stop), opts, workers)) as results:
                for index, res in results:
                    if res[0] == "ok" and res[1] in seen:
                        res = ("bad", res[1], index, "duplicate_key", f"record {res[1]!r}: key already written")
                    if res[0] == "bad":
                        _, key, index, reason, message = res
                        if unit != "row" and index is not None:
                            message = f"{unit} {index}: {message}"
                        rej.write((json.dumps({"key": key, unit: index, "reason": reason, "message": message})
                                   + "\n").encode("utf-8"))
                        summary.rejected += 1
                        summary.reasons[reason] += 1
                        summary.first_reject = summary.first_reject or message
                        if watch:
                            missing = missing + 1 if reason == "missing_image" else -1
                    else:
                        size = ShardSink.sample_size(res[2])
                        if not sink.fits(size):  # the shard is full: finished and journaled before this sample
                            _finish_shard(sink, shards, journal, rej, position, summary)
                        if check_duplicates:
                            seen.add(res[1])
                        sink.write(res[1], res[2], size)
                        summary.written += 1
                        missing = -1
                    position += 1
                    if watch and (missing < 0 or missing >= watch):
                        if missing >= watch:
                            raise ImageRootError(_image_root_message(missing, unit, summary.first_reject, opts))
                        watch = 0
                    if progress is not None:
                        progress.update(position - start, summary.written, summary.rejected)
                if watch and missing > 0 and whole:  # fewer items than early_abort, none with its image
                    raise ImageRootError(_image_root_message(missing, unit, summary.first_reject, opts))
                if sink.open:
                    shards.append(sink.finish())
                rej.flush()
                end = Checkpoint(next=position, written=summary.written, rejected=summary.rejected,
                                 reasons=dict(summary.reasons), rejects_bytes=rej.tell(),
                                 first_reject=summary.first_reject, complete=True,
                                 shard=_relative(shards[-1], jpath) if shards[len(journal.shards):] else None)
                journal.append(end)
            finished = True
        except ImageRootError:
            sink.abort()
            jpath.unlink(missing_ok=True)  # nothing was converted: the next run starts afresh, any image root
            rejects_path.unlink(missing_ok=True)
            raise
        except BaseException:
            sink.abort()
            raise
        finally:
            if progress is not None:
                progress.close(position - start, summary.written, summary.rejected, finished)
        summary.items = position - start
        _write_manifest(summary, settings, dataset, start, end, rejects_path)
    return summary


def _image_root_message(n: int, unit: str, first: str, opts: ConvertOptions) -> str:
    return (f"the first {n} {unit}s all failed with missing_image (first: {first}): the image root "
            f"{opts.image_root} looks wrong, nothing was written; fix --image-root (the input's image paths are "
            "relative to it), or pass --early-abort 0 if these records really lack their images")


def _relative(shard: dict, jpath: Path) -> dict:
    return {**shard, "name": os.path.relpath(shard["name"], jpath.parent)}


def _finish_shard(sink: ShardSink, shards: list[dict], journal: Journal, rej: Any, position: int,
                  summary: ConvertSummary) -> None:
    """Finish the open shard and journal it with the state before the item at ``position`` (the one that did not
    fit, which a resumed run reads again): the rejects so far are flushed first, so their length is exact."""
    shards.append(sink.finish())
    rej.flush()
    journal.append(Checkpoint(next=position, written=summary.written, rejected=summary.rejected,
                              reasons=dict(summary.reasons), rejects_bytes=rej.tell(),
                              first_reject=summary.first_reject, shard=_relative(shards[-1], journal.path)))


def _settings(output: str, manifest: Path, rejects: Path, part: tuple[int, int] | None, opts: Any, src: Source,
              dataset: dict, unit: str, check_duplicates: bool, max_samples: int, max_bytes: int) -> dict:
    """Everything that decides the output's bytes and places (not ``workers`` nor the batch size, which do not):
    a resumed run and the parts of one conversion must agree on all of it."""
    options = asdict(opts) if is_dataclass(opts) else {"repr": repr(opts)}
    options["image_root"] = os.path.abspath(opts.image_root)
    return json.loads(json.dumps({
        "output": os.path.abspath(output), "manifest": os.path.abspath(manifest),
        "rejects": os.path.abspath(rejects), "parts": None if part is None else part[1],
        "options": {"kind": type(opts).__name__, **options}, "input": src.fingerprint(), "dataset": dataset,
        "unit": unit, "check_duplicates": check_duplicates, "max_samples_per_shard": max_samples,
        "max_bytes_per_shard": max_bytes}, default=str))  # plain JSON types: compared with a journal's


def _remove(paths: list[Path]) -> None:
    for p in paths:
        p.unlink(missing_ok=True)


def _prepare_output(pattern: str, manifest: Path, rejects: Path, jpath: Path, settings: dict, start: int,
                    stop: int | None, overwrite: bool) -> tuple[Journal, Checkpoint | None]:
    """Make the output place ready and return its journal and the checkpoint to continue from (None: from the
    start). A fresh start refuses an earlier conversion's output without ``overwrite``; with it, that
    conversion's manifest goes first (atomically, before any shard is touched), then its journal and shards, so
    an interruption from here on leaves no manifest that lists stale or missing shards. A resume keeps the
    shards its journal verifies and removes what came after them."""
    journal = None if overwrite else Journal.read(jpath)
    files = pattern_files(pattern)
    manifests = stale_manifests(manifest, pattern, files)
    if journal is None:
        existing = [p for p in files if p.suffix != ".tmp"] + manifests
        if existing and not overwrite:
            raise FileExistsError(f"{existing[0]} exists (an earlier conversion without a journal); pass "
                                  "--overwrite to replace it, or choose another --output / --manifest")
        for m in manifests:
            m.unlink(missing_ok=True)
            fsync_dir(m.parent)
        _remove([manifest.with_name(manifest.name + ".tmp"), jpath, *files])
        rejects.parent.mkdir(parents=True, exist_ok=True)
        rejects.write_bytes(b"")
        journal = Journal(jpath, settings, start, stop)
        journal.save()  # before any shard: every shard from here on is journaled, or removed by a resume
        return journal, None
    diff = settings_diff(journal.settings, settings)
    if diff:
        raise ValueError(f"{jpath}: this output was started with other settings ({diff}); re-run with the "
                         "earlier settings to resume, or pass --overwrite to start over")
    keep = journal.checkpoints[:journal.verified(rejects)]
    last = keep[-1] if keep else None
    if last is not None and last.complete and len(keep) == len(journal.checkpoints):
        return journal, last
    for m in manifests:  # they list shards about to be rewritten
        m.unlink(missing_ok=True)
        fsync_dir(m.parent)
    kept = {jpath.parent / c.shard["name"] for c in keep if c.shard is not None}
    _remove([p for p in files if p not in kept])
    journal.checkpoints = keep
    journal.save()
    with open(rejects, "ab") as f:  # drop the rejects after the checkpoint: the resumed run writes them again
        f.truncate(last.rejects_bytes if last is not None else 0)
    return journal, last


def _write_manifest(summary: ConvertSummary, settings: dict, dataset: dict, start: int, end: Checkpoint,
                    rejects: Path) -> None:
    """The dataset manifest; for a part, its part manifest, which also says what the merge needs."""
    fields = manifest_fields(dataset, summary.rejected, dict(summary.reasons))
    path = Path(summary.manifest)
    if summary.part is None:
        write_manifest(path, summary.shards, **fields)
        return
    index, count = summary.part
    write_manifest(path, summary.shards, **fields, complete=True,
                   part={"index": index, "count": count, "start": start, "stop": end.next},
                   rejects=os.path.relpath(rejects, path.parent), rejects_bytes=end.rejects_bytes,
                   first_reject=end.first_reject, dataset=dataset, settings=settings)


__all__ = ["CHUNK", "EARLY_ABORT_RECORDS", "PROGRESS_EVERY_S", "ConvertOptions", "ConvertSummary", "ImageRootError",
           "Interrupted", "Prepared", "Preparer", "Progress", "prepared", "rejected", "run_conversion"]
