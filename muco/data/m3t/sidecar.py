"""The mined-negatives sidecar: a directory the training data path joins to its samples.

    <dir>/manifest.json          {"format": "muco-negatives/1", "parts": [...], "model", "shards", "top_k",
                                  "margin", "num_query_turns", "summary", "settings"}
    <dir>/part-00000.jsonl.gz    one JSON line per (sample, stored turn):
                                 {"key", "turn", "pos_sim", "negatives": [{"text", "rank", "sim"}, ...]}

``turn`` is the index of the turn in the record as stored (0-based), not a drawn order; ``rank`` is 1-based
among the kept negatives (1 = hardest), and negatives are sorted by rank. Every file is written to a ``.tmp``
name and renamed when complete, and the manifest is written last (and removed first when a directory is
rewritten), so a directory with a manifest is complete and a killed run leaves no half file behind.
"""

from __future__ import annotations

import gzip
import io
import json
import os
from collections.abc import Container, Iterable, Mapping
from pathlib import Path
from typing import Any, NamedTuple

FORMAT = "muco-negatives/1"
MANIFEST = "manifest.json"
PART_NAME = "part-{:05d}.jsonl.gz"


class MinedNegative(NamedTuple):
    text: str
    rank: int  # 1-based among the kept negatives of its (key, turn)
    sim: float


class SidecarError(ValueError):
    """A sidecar directory that cannot be read; the message says what to do."""


def _write_atomic(path: Path, data: bytes) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _write_part(path: Path, lines: list[str]) -> None:
    tmp = path.with_name(path.name + ".tmp")
    try:  # mtime 0: reproducible bytes
        with open(tmp, "wb") as raw, gzip.GzipFile(fileobj=raw, mode="wb", compresslevel=6, mtime=0) as gz:
            with io.TextIOWrapper(gz, encoding="utf-8") as f:
                f.writelines(lines)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def write_sidecar(out_dir: str | os.PathLike, rows: Iterable[Mapping[str, Any]], manifest: Mapping[str, Any],
                  rows_per_part: int = 100_000) -> Path:
    """Write ``rows`` (dicts of the line format) in parts, then ``manifest.json`` with ``manifest``'s fields
    plus ``format``, ``parts`` and ``num_query_turns``. Returns the manifest path."""
    if rows_per_part < 1:
        raise ValueError(f"rows_per_part must be >= 1, got {rows_per_part}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / MANIFEST).unlink(missing_ok=True)  # from here on the directory reads as incomplete
    parts: list[str] = []
    buf: list[str] = []
    n = 0
    for row in rows:
        buf.append(json.dumps(row, ensure_ascii=False, separators=(",", ":")) + "\n")
        n += 1
        if len(buf) == rows_per_part:
            parts.append(PART_NAME.format(len(parts)))
            _write_part(out / parts[-1], buf)
            buf = []
    if buf or not parts:
        parts.append(PART_NAME.format(len(parts)))
        _write_part(out / parts[-1], buf)
    for stale in out.glob("part-*.jsonl.gz"):  # parts of an earlier, larger run
        if stale.name not in parts:
            stale.unlink()
    obj = {"format": FORMAT, **manifest, "parts": parts, "num_query_turns": n}
    _write_atomic(out / MANIFEST, (json.dumps(obj, indent=1, ensure_ascii=False) + "\n").encode("utf-8"))
    return out / MANIFEST


def read_sidecar_manifest(path: str | os.PathLike) -> dict[str, Any]:
    """The manifest of a sidecar directory (or of the ``manifest.json`` path itself), checked."""
    p = Path(path)
    mpath = p if p.name == MANIFEST and not p.is_dir() else p / MANIFEST
    if not mpath.is_file():
        why = "does not exist" if not mpath.parent.is_dir() else "has no manifest.json (an unfinished run?)"
        raise SidecarError(f"mined-negatives sidecar {mpath.parent} {why}; run `muco mine ... --output "
                           f"{mpath.parent}` first")
    try:
        obj = json.loads(mpath.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise SidecarError(f"{mpath} is not valid JSON ({e}); re-run `muco mine --overwrite`") from None
    fmt = obj.get("format") if isinstance(obj, dict) else None
    if fmt != FORMAT:
        raise SidecarError(f"{mpath} has format {fmt!r}, expected {FORMAT!r}: not a muco mined-negatives "
                           "sidecar, or one written by an incompatible version; re-run `muco mine`")
    parts = obj.get("parts")
    if not isinstance(parts, list) or not all(isinstance(x, str) for x in parts):
        raise SidecarError(f"{mpath}: 'parts' must be a list of file names")
    missing = [x for x in parts if not (mpath.parent / x).is_file()]
    if missing:
        raise SidecarError(f"{mpath} lists {len(missing)} part(s) that do not exist, e.g. {missing[0]}; "
                           "re-run `muco mine --overwrite`")
    return obj


def iter_sidecar_rows(path: str | os.PathLike) -> Iterable[dict[str, Any]]:
    """The raw line dicts of every part, in order."""
    p = Path(path)
    root = p.parent if p.name == MANIFEST and not p.is_dir() else p
    for part in read_sidecar_manifest(root)["parts"]:
        with gzip.open(root / part, "rt", encoding="utf-8") as f:
            for lineno, line in enumerate(f, 1):
                try:
                    yield json.loads(line)
                except json.JSONDecodeError as e:
                    raise SidecarError(f"{root / part} line {lineno} is not valid JSON ({e})") from None


def load_sidecar(
    path: str | os.PathLike, keys: Container[str] | None = None
) -> dict[tuple[str, int], list[MinedNegative]]:
    """``{(sample key, stored turn index): [MinedNegative(text, rank, sim), ...]}``, negatives by rank.

    A (key, turn) absent from the sidecar simply has no mined negatives: look it up with ``.get(k, [])``.
    ``keys`` restricts the result to those sample keys (memory on large sidecars).
    """
    out: dict[tuple[str, int], list[MinedNegative]] = {}
    for row in iter_sidecar_rows(path):
        try:
            key, turn = row["key"], int(row["turn"])
            if keys is not None and key not in keys:
                continue
            negs = [MinedNegative(n["text"], int(n["rank"]), float(n["sim"])) for n in row["negatives"]]
        except (KeyError, TypeError, ValueError) as e:
            raise SidecarError(f"sidecar {path}: malformed line {str(row)[:200]} ({type(e).__name__}: {e})") \
                from None
        negs.sort(key=lambda n: n.rank)
        out[(key, turn)] = negs
    return out
