"""Conversions that fit a cluster: parts, the progress journal that makes a conversion resumable, and the merge
of part manifests into the dataset manifest (``muco data convert --part I/N``, ``muco data merge-manifests``).

File names. A single conversion with ``--output out/train-%06d.tar`` writes ``out/train-000000.tar`` ...,
``out/manifest.json``, ``out/rejects.jsonl`` and the journal ``out/train-progress.jsonl``. Part ``I`` of ``N``
(0-based) writes ``out/train-pIIII-000000.tar`` ..., ``out/manifest-pIIII.json`` (its part manifest),
``out/rejects-pIIII.jsonl`` and ``out/train-pIIII-progress.jsonl`` (at least 4 digits), so parts never collide
with each other nor with a single conversion; the merge writes ``out/manifest.json`` and ``out/rejects.jsonl``.

The journal is a JSONL file: a header (the settings the output was started with, and the range of input
positions) and then one checkpoint per finished shard, appended and fsynced once the shard is renamed into
place: its name, size and sha256, and the state after it: the position of the next input item, the counts and
reasons of rejects so far and the byte length of the rejects file. A killed run leaves at most an unfinished
``.tmp`` shard and a torn last line, both ignored. A re-run verifies the finished shards (size and hash) and
continues from the last checkpoint whose shards verify: the source seeks to its position, the rejects file is
truncated to its length, later shards are removed. Shards are deterministic (tar members with mtime 0), so the
result is byte-identical to an uninterrupted run.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import re
import tarfile
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from muco.data.shards import MANIFEST_NAME, write_manifest

JOURNAL_VERSION = 1
PART_DIGITS = 4  # at least; more when N needs them
_SPEC = re.compile(r"%0?\d*d")


# -- naming -------------------------------------------------------------------------------------------------------
def parse_part(text: str) -> tuple[int, int]:
    """``"I/N"`` -> (I, N) with 0 <= I < N."""
    m = re.fullmatch(r"\s*(\d+)\s*/\s*(\d+)\s*", text)
    if not m or not 0 <= int(m.group(1)) < int(m.group(2)):
        raise ValueError(f"--part {text!r}: give I/N with 0 <= I < N, I 0-based, e.g. 3/8 "
                         "(--part $SLURM_ARRAY_TASK_ID/$SLURM_ARRAY_TASK_COUNT with --array=0-7)")
    return int(m.group(1)), int(m.group(2))


def part_range(total: int, index: int, count: int) -> tuple[int, int]:
    """Positions [start, stop) of part ``index`` of ``count``: contiguous, disjoint, sizes differing by at most 1."""
    return index * total // count, (index + 1) * total // count


def part_tag(index: int, count: int) -> str:
    return f"p{index:0{max(PART_DIGITS, len(str(count - 1)))}d}"


def _spec_in_name(pattern: str) -> tuple[str, re.Match]:
    name = Path(pattern).name
    spec = _SPEC.search(name)
    if "%" not in pattern:
        raise ValueError(f"output pattern {pattern!r} needs a %-index, e.g. out/train-%06d.tar")
    if spec is None or "%" in str(Path(pattern).parent):
        raise ValueError(f"output pattern {pattern!r}: put the %-index (%d, %06d) in the file name, "
                         "e.g. out/train-%06d.tar")
    return name, spec


def part_pattern(pattern: str, index: int, count: int) -> str:
    """The shard pattern of a part: ``out/train-%06d.tar`` -> ``out/train-p0003-%06d.tar``."""
    name, spec = _spec_in_name(pattern)
    return str(Path(pattern).with_name(f"{name[:spec.start()]}{part_tag(index, count)}-{name[spec.start():]}"))


def part_path(path: str | os.PathLike, index: int, count: int) -> Path:
    """A part's own manifest / rejects file: ``out/manifest.json`` -> ``out/manifest-p0003.json``."""
    p = Path(path)
    return p.with_name(f"{p.stem}-{part_tag(index, count)}{p.suffix}")


def journal_path(pattern: str) -> Path:
    """The journal next to the shards: ``out/train-%06d.tar`` -> ``out/train-progress.jsonl``."""
    name, spec = _spec_in_name(pattern)
    return Path(pattern).with_name(f"{name[:spec.start()]}progress.jsonl")


def pattern_files(pattern: str) -> list[Path]:
    """Every existing shard of ``pattern`` and leftover ``.tmp``, at any index (also past a gap in the numbering)."""
    name, spec = _spec_in_name(pattern)
    directory = Path(pattern).parent
    if not directory.is_dir():
        return []
    rx = re.compile(re.escape(name[:spec.start()]) + r"(\d+)" + re.escape(name[spec.end():]) + r"(\.tmp)?")
    found = []
    for entry in sorted(os.listdir(directory)):
        m = rx.fullmatch(entry)
        if m and Path(pattern % int(m.group(1))) == directory / entry.removesuffix(".tmp"):
            found.append(directory / entry)
    return found


def stale_manifests(manifest: Path, pattern: str, shards: list[Path]) -> list[Path]:
    """The manifest about to be written, and a manifest at the default place that lists any of ``shards`` (for a
    part: the merged manifest)."""
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


def fsync_dir(directory: Path) -> None:
    with contextlib.suppress(OSError):
        fd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


# -- settings -----------------------------------------------------------------------------------------------------
def settings_diff(old: Any, new: Any, where: str = "") -> str | None:
    """The first setting that differs, as ``name: <old> then, <new> now``; None when they are the same."""
    if isinstance(old, dict) and isinstance(new, dict):
        for k in list(old) + [k for k in new if k not in old]:
            d = settings_diff(old.get(k), new.get(k), f"{where}.{k}" if where else str(k))
            if d:
                return d
        return None
    if old == new:
        return None

    def short(v: Any) -> str:
        s = json.dumps(v)
        return s if len(s) <= 80 else s[:77] + "..."

    return f"{where}: {short(old)} then, {short(new)} now"


# -- shards -------------------------------------------------------------------------------------------------------
def sha256_file(path: str | os.PathLike) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


class _HashingFile:
    """What tarfile writes to: the shard file, hashed on the way (no second read of a finished shard)."""

    def __init__(self, f: io.BufferedWriter) -> None:
        self.f, self.hash, self.size = f, hashlib.sha256(), 0

    def write(self, data: bytes) -> int:
        self.hash.update(data)
        self.size += len(data)
        return self.f.write(data)

    def tell(self) -> int:
        return self.size


class ShardSink:
    """Writes samples into size-capped tar shards ``pattern % index`` from ``first_index`` on, each to a ``.tmp``
    renamed into place when finished; :meth:`finish` returns the shard's entry with its sha256. The caller decides
    when a shard is full (:meth:`fits`), so that it can journal the input position at that moment."""

    def __init__(self, pattern: str, max_samples: int, max_bytes: int, first_index: int = 0) -> None:
        self.pattern, self.max_samples, self.max_bytes, self.index = pattern, max_samples, max_bytes, first_index
        self.tar: tarfile.TarFile | None = None
        self.file: _HashingFile | None = None
        self.count = self.bytes = 0

    @staticmethod
    def sample_size(members: list[tuple[str, bytes]]) -> int:
        return sum(512 + (len(d) + 511) // 512 * 512 for _, d in members)  # tar header + padded data

    def fits(self, size: int) -> bool:
        """Whether a sample of ``size`` tar bytes goes into the open shard (always, when none is open)."""
        return self.tar is None or (self.count < self.max_samples and self.bytes + size <= self.max_bytes)

    def write(self, key: str, members: list[tuple[str, bytes]], size: int) -> None:
        if self.tar is None:
            final = self.pattern % self.index
            Path(final).parent.mkdir(parents=True, exist_ok=True)
            self.file = _HashingFile(open(final + ".tmp", "wb"))  # noqa: SIM115 -- closed in finish / abort
            self.tar = tarfile.open(fileobj=self.file, mode="w", format=tarfile.USTAR_FORMAT)  # type: ignore[call-overload]
            self.count = self.bytes = 0
        for ext, data in members:
            info = tarfile.TarInfo(f"{key}.{ext}")
            info.size, info.mode, info.mtime = len(data), 0o444, 0  # mtime 0: reproducible shards
            self.tar.addfile(info, io.BytesIO(data))
        self.count += 1
        self.bytes += size

    def finish(self) -> dict:
        """Close the open shard and rename it into place: ``{name, num_samples, bytes, sha256}``."""
        assert self.tar is not None and self.file is not None
        self.tar.close()
        self.file.f.close()
        final = self.pattern % self.index
        os.replace(final + ".tmp", final)
        entry = {"name": final, "num_samples": self.count, "bytes": self.file.size,
                 "sha256": self.file.hash.hexdigest()}
        self.tar = self.file = None
        self.index += 1
        return entry

    def abort(self) -> None:
        """Drop the unfinished shard (finished shards stay: each is complete and journaled)."""
        if self.tar is not None and self.file is not None:
            with contextlib.suppress(OSError):
                self.tar.close()
            self.file.f.close()
            Path(self.pattern % self.index + ".tmp").unlink(missing_ok=True)
            self.tar = self.file = None

    @property
    def open(self) -> bool:
        return self.tar is not None


def shard_keys(path: str | os.PathLike) -> list[str]:
    """The sample keys of a shard, in order (tar headers only)."""
    keys: list[str] = []
    with tarfile.open(path, mode="r:") as tar:
        for info in tar:
            key = info.name.split(".", 1)[0]
            if not keys or keys[-1] != key:
                keys.append(key)
    return keys


# -- the journal --------------------------------------------------------------------------------------------------
@dataclass
class Checkpoint:
    """The state of a conversion after a finished shard (or at its end, ``complete``): ``next`` is the position
    of the next input item, ``written`` / ``rejected`` / ``reasons`` count everything before it, ``rejects_bytes``
    is the length of the rejects file then; ``shard`` (name relative to the journal) was just finished."""

    next: int
    written: int = 0
    rejected: int = 0
    reasons: dict[str, int] = field(default_factory=dict)
    rejects_bytes: int = 0
    first_reject: str = ""
    shard: dict | None = None
    complete: bool = False


class Journal:
    """The progress journal of one output (see the module docstring)."""

    def __init__(self, path: Path, settings: dict, start: int, stop: int | None,
                 checkpoints: list[Checkpoint] | None = None) -> None:
        self.path, self.settings, self.start, self.stop = Path(path), settings, start, stop
        self.checkpoints = list(checkpoints or [])

    @classmethod
    def read(cls, path: Path) -> Journal | None:
        """The journal at ``path``; None when there is none (or only a torn header: nothing was finished)."""
        try:
            raw = Path(path).read_bytes()
        except FileNotFoundError:
            return None
        lines = raw.split(b"\n")
        try:
            head = json.loads(lines[0])
            if head.get("journal") != JOURNAL_VERSION:
                raise ValueError(f"journal version {head.get('journal')!r}, expected {JOURNAL_VERSION}")
        except ValueError as e:
            if len(lines) == 1:  # killed while writing the header: nothing was finished
                return None
            raise ValueError(f"{path} is not a muco conversion journal ({e}); pass --overwrite to start over, or "
                             "remove it") from None
        checkpoints = []
        for line in lines[1:]:
            try:
                checkpoints.append(Checkpoint(**json.loads(line)))
            except (ValueError, TypeError):
                break  # the torn last line of a killed run: the checkpoints before it stand
        return cls(Path(path), head["settings"], head["start"], head.get("stop"), checkpoints)

    def _header(self) -> str:
        return json.dumps({"journal": JOURNAL_VERSION, "settings": self.settings, "start": self.start,
                           "stop": self.stop})

    def save(self) -> None:
        """(Re)write the whole journal atomically: the header and the current checkpoints."""
        tmp = self.path.with_name(self.path.name + ".tmp")
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(tmp, "w", encoding="utf-8") as f:
            f.write("\n".join([self._header()] + [json.dumps(asdict(c)) for c in self.checkpoints]) + "\n")
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, self.path)
        fsync_dir(self.path.parent)

    def append(self, cp: Checkpoint) -> None:
        """Record one more checkpoint: one line, fsynced (a torn line from a kill is ignored by :meth:`read`)."""
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(json.dumps(asdict(cp)) + "\n")
            f.flush()
            os.fsync(f.fileno())
        self.checkpoints.append(cp)

    @property
    def shards(self) -> list[dict]:
        """The finished shards, names relative to the journal's directory."""
        return [c.shard for c in self.checkpoints if c.shard is not None]

    def verified(self, rejects: Path) -> int:
        """How many leading checkpoints stand: each of their shards has the recorded size and sha256 (hashed in
        threads: hashlib releases the GIL) and the rejects file holds at least their rejects."""
        have = rejects.stat().st_size if rejects.exists() else 0
        directory = self.path.parent

        def ok(cp: Checkpoint) -> bool:
            if cp.rejects_bytes > have:
                return False
            if cp.shard is None:
                return True
            p = directory / cp.shard["name"]
            return p.is_file() and p.stat().st_size == cp.shard["bytes"] and sha256_file(p) == cp.shard["sha256"]

        with ThreadPoolExecutor(min(8, os.cpu_count() or 1)) as ex:
            n = 0
            for good in ex.map(ok, self.checkpoints):
                if not good:
                    break
                n += 1
        return n


# -- part manifests and their merge -------------------------------------------------------------------------------
def manifest_fields(dataset: dict, rejected: int, reasons: dict[str, int]) -> dict:
    """The fields of a dataset manifest besides the shards: the kind's own, the source, the limits, the rejects."""
    return {**dataset, "rejected": rejected, "reasons": dict(sorted(reasons.items()))}


def summary_line(written: int, shards: int, rejected: int, reasons: dict[str, int], first_reject: str,
                 manifest: str, rejects: str) -> str:
    why = ", ".join(f"{k}={v}" for k, v in Counter(reasons).most_common()) or "none"
    first = first_reject if len(first_reject) <= 160 else first_reject[:157] + "..."
    return (f"wrote {written} samples into {shards} shards; rejected {rejected} "
            f"({why}{'; first: ' + first if first else ''}); manifest: {manifest}; rejects: {rejects}")


@dataclass
class MergeSummary:
    parts: int = 0
    written: int = 0
    rejected: int = 0
    shards: list[dict] = field(default_factory=list)
    reasons: Counter = field(default_factory=Counter)
    manifest: str = ""
    rejects: str = ""
    first_reject: str = ""

    def __str__(self) -> str:
        return f"merged {self.parts} parts: " + summary_line(
            self.written, len(self.shards), self.rejected, self.reasons, self.first_reject, self.manifest,
            self.rejects)


_PART_FILE = re.compile(r".+-p\d{4,}\.json")


def _load_part(path: Path) -> dict:
    try:
        obj = json.loads(path.read_text(encoding="utf-8"))
        part = obj["part"]
        int(part["index"]), int(part["count"])
        obj["settings"], obj["shards"]
    except FileNotFoundError:
        raise FileNotFoundError(f"part manifest {path} does not exist; fix the path") from None
    except (ValueError, KeyError, TypeError):
        raise ValueError(f"{path} is not a part manifest (no valid 'part' field); give the manifest-pNNNN.json "
                         "files that `muco data convert --part I/N` writes") from None
    return obj


def find_part_manifests(inputs: list[str]) -> list[Path]:
    """The part manifests among ``inputs``: files as given, and for a directory its ``*-pNNNN.json`` files."""
    out: list[Path] = []
    for given in inputs:
        p = Path(given)
        if p.is_dir():
            out += sorted(q for q in p.iterdir() if _PART_FILE.fullmatch(q.name))
        else:
            out.append(p)
    if not out:
        raise FileNotFoundError(f"no part manifest (*-pNNNN.json) in {', '.join(inputs)}; convert with "
                                "`muco data convert ... --part I/N` first")
    return out


def _missing_part(index: int, count: int, settings: dict, directory: Path, manifest_name: str) -> str:
    expected = directory / part_path(manifest_name, index, count).name
    journal = journal_path(part_pattern(settings["output"], index, count))
    state = "it has not started (no journal)"
    with contextlib.suppress(ValueError, OSError):
        j = Journal.read(journal)
        if j is not None and j.checkpoints and j.checkpoints[-1].complete:
            state = f"its journal {journal} says it finished (re-running its command rewrites the manifest)"
        elif j is not None:
            state = f"it has not finished ({journal} records {len(j.shards)} finished shards)"
    return (f"part {index}/{count} is missing: {expected} does not exist and {state}; run (or re-run, it resumes) "
            f"`muco data convert ... --part {index}/{count}`, then merge again")


def merge_parts(inputs: list[str], manifest: str | None = None, rejects: str | None = None,
                overwrite: bool = False) -> MergeSummary:
    """Merge the part manifests of one ``--part I/N`` conversion (files, or a directory holding them) into the
    dataset manifest and one rejects file, in part order: the shards' samples and the rejects come out in the
    order of a single conversion. Refuses (ValueError / FileNotFoundError, one line) when a part is missing or
    incomplete, when parts come from different conversions, and when a key is written by two parts (a single
    conversion would have rejected the second as ``duplicate_key``). Defaults: ``manifest.json`` and
    ``rejects.jsonl`` (the names the parts were given, without ``-pNNNN``) next to the part manifests."""
    paths = find_part_manifests(inputs)
    parts: dict[int, tuple[Path, dict]] = {}
    first_path, first = paths[0], _load_part(paths[0])
    count = int(first["part"]["count"])
    for path in paths:
        obj = first if path == first_path else _load_part(path)
        index = int(obj["part"]["index"])
        diff = settings_diff(first["settings"], obj["settings"])
        if diff or int(obj["part"]["count"]) != count:
            raise ValueError(f"{first_path} and {path} come from different conversions ({diff or 'part count'}); "
                             "merge the parts of one command only")
        if index in parts and parts[index][0].resolve() != path.resolve():
            raise ValueError(f"{parts[index][0]} and {path} are both part {index}/{count}; remove the stray one")
        parts[index] = (path, obj)
    directory = first_path.parent
    base_manifest = re.sub(r"-p\d{4,}(\.[^.]*)?$", r"\1", first_path.name)
    for i in range(count):
        if i not in parts:
            raise FileNotFoundError(_missing_part(i, count, first["settings"], directory, base_manifest))
    manifest_path = Path(manifest) if manifest else directory / base_manifest
    rejects_path = Path(rejects) if rejects else directory / re.sub(
        r"-p\d{4,}(\.[^.]*)?$", r"\1", Path(first["rejects"]).name)

    summary = MergeSummary(parts=count, manifest=str(manifest_path), rejects=str(rejects_path))
    stop = 0
    seen: dict[str, int] = {}
    check_keys = bool(first["settings"].get("check_duplicates")) and count > 1
    part_rejects = []
    for i in range(count):
        path, obj = parts[i]
        where = f"part {i}/{count} ({path})"
        if not obj.get("complete") or int(obj["part"]["start"]) != stop:
            raise ValueError(f"{where} is incomplete or does not follow part {i - 1}; re-run its command")
        stop = int(obj["part"]["stop"])
        for s in obj["shards"]:
            shard = path.parent / s["name"]
            if not shard.is_file() or shard.stat().st_size != s["bytes"]:
                raise FileNotFoundError(f"{where}: shard {shard} is missing or has the wrong size; re-run that "
                                        "part's command (it verifies its shards and rewrites what is wrong)")
            if check_keys:
                for key in shard_keys(shard):
                    if seen.setdefault(key, i) != i:
                        raise ValueError(f"key {key!r} is written by part {seen[key]} and part {i}: the input has "
                                         "duplicate keys across parts (one job would reject the second); convert "
                                         "it without --part, or remove the duplicates")
            summary.shards.append({**s, "name": str(shard)})
        rej = path.parent / obj["rejects"]
        if int(obj["rejects_bytes"]) and (not rej.is_file() or rej.stat().st_size < int(obj["rejects_bytes"])):
            raise FileNotFoundError(f"{where}: its rejects file {rej} is missing or short; re-run that part's "
                                    "command")
        part_rejects.append((rej, int(obj["rejects_bytes"])))
        summary.written += int(obj["num_samples"])
        summary.rejected += int(obj["rejected"])
        summary.reasons.update(obj.get("reasons") or {})
        summary.first_reject = summary.first_reject or obj.get("first_reject") or ""

    if manifest_path.exists() and not overwrite:
        try:
            previous = json.loads(manifest_path.read_text(encoding="utf-8")).get("parts")
        except (OSError, ValueError, AttributeError):
            previous = None
        if previous != count:  # a merge of the same parts may be redone; anything else is another conversion
            raise FileExistsError(f"{manifest_path} exists and is not a merge of these {count} parts; pass "
                                  "--overwrite to replace it, or choose another --manifest")
    # the rejects first, then the manifest (atomically, last): a merge that fails leaves no new manifest
    tmp = rejects_path.with_name(rejects_path.name + ".tmp")
    with open(tmp, "wb") as out:
        for rej, length in part_rejects:
            if length:
                _copy_head(rej, length, out)
    os.replace(tmp, rejects_path)
    write_manifest(manifest_path, summary.shards, **manifest_fields(first["dataset"], summary.rejected,
                                                                    dict(summary.reasons)), parts=count)
    return summary


def _copy_head(path: Path, length: int, out: io.BufferedWriter) -> None:
    """Copy the first ``length`` bytes of ``path`` (a part's rejects, as its manifest records them)."""
    with open(path, "rb") as f:
        while length > 0:
            block = f.read(min(length, 1 << 20))
            if not block:
                break
            out.write(block)
            length -= len(block)


__all__ = ["JOURNAL_VERSION", "PART_DIGITS", "Checkpoint", "Journal", "MergeSummary", "ShardSink",
           "find_part_manifests", "fsync_dir", "journal_path", "manifest_fields", "merge_parts", "parse_part",
           "part_path", "part_pattern", "part_range", "part_tag", "pattern_files", "settings_diff", "sha256_file",
           "shard_keys", "stale_manifests", "summary_line"]
