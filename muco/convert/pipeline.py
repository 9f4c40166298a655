"""The conversion pipeline every record kind shares: input items -> webdataset shards + rejects + manifest.

A record kind supplies a *preparer* ``prepare(index, payload, key, opts)`` that turns one input item into
:func:`prepared` ``(key, members)`` or :func:`rejected` (the reason and message of a bad record); see
``muco.convert.m3t`` and ``muco.convert.pairs``. :func:`run_conversion` runs the preparer over the items, in a
process pool when ``workers > 0`` (spawned, so the preparer must be a module-level function or another picklable
object, and scripts calling the library with workers need an ``if __name__ == "__main__"`` guard), and one writer
keeps the output in input order, whatever the number of workers. Bad records are skipped, counted and listed in
a rejects JSONL with their row or line number.

An earlier conversion at the same place is replaced only with ``overwrite``: its manifest is removed first, then
every shard of the pattern, and the new manifest is written atomically last, so a conversion that is killed
leaves no manifest (training refuses to start) rather than one that lists the wrong samples. The workers stop
with the converter: on SIGTERM/SIGHUP it raises :class:`Interrupted` (SIGINT: ``KeyboardInterrupt``) and
terminates them, and a worker whose parent dies (even by SIGKILL) exits.
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
from dataclasses import dataclass, field
from itertools import islice
from pathlib import Path
from typing import Any

from muco.data.records import MAX_SEQUENCE_CHARS, MAX_TEXT_CHARS
from muco.data.shards import MANIFEST_NAME, ShardWriter, write_manifest

CHUNK = 32  # items per pool task: amortises pickling without holding many rows in flight


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


# A preparer's result: ("ok", key, members) or ("bad", key, index, reason, message); build it with these two.
Prepared = tuple
Preparer = Callable[[int, Any, str | None, Any], Prepared]  # (index, payload, key, opts) -> Prepared


def prepared(key: str, members: list[tuple[str, bytes]]) -> Prepared:
    """A good record: its key and its shard members ``(extension, bytes)``, in the order they are written."""
    return ("ok", key, members)


def rejected(index: int | None, key: str | None, error: Exception) -> Prepared:
    """A bad record: ``error`` carries the ``reason`` (its category in the summary) and the message; the key is
    the error's own when it has one (a line's key is only known once it is parsed)."""
    return ("bad", getattr(error, "key", None) or key, index, getattr(error, "reason", "error"), str(error))


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
    if workers <= 0:
        for chunk in _chunks(items):
            yield from zip([i for i, _, _ in chunk], _prepare_chunk(prepare, chunk, opts))
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


def run_conversion(prepare: Preparer, items: Iterable[tuple[int, Any, str | None]], output: str,
                   opts: ConvertOptions, *, max_samples_per_shard: int, max_bytes_per_shard: int, workers: int,
                   manifest: str | None, rejects: str | None, overwrite: bool, source: str,
                   manifest_extra: dict | None = None, unit: str = "row",
                   check_duplicates: bool = True) -> ConvertSummary:
    """Convert ``items`` ``(index, payload, key)`` (see ``muco.convert.sources``) with ``prepare`` into shards
    ``output % i``, a rejects JSONL and a manifest (default: next to the shards). ``unit`` names the index in
    rejects and messages ("row" of a parquet, "line" of a JSONL); ``manifest_extra`` adds the kind's own fields to
    the manifest; ``check_duplicates=False`` skips the duplicate-key check where keys are unique by construction.
    """
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
                contextlib.closing(_results(prepare, items, opts, workers)) as results:
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
                if check_duplicates:
                    seen.add(res[1])
                writer.write(res[1], res[2])
                summary.written += 1
        summary.shards = writer.shards
        write_manifest(summary.manifest, summary.shards, **(manifest_extra or {}), source=source,
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


__all__ = ["CHUNK", "ConvertOptions", "ConvertSummary", "Interrupted", "Prepared", "Preparer", "prepared",
           "rejected", "run_conversion"]
