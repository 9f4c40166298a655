"""Shard files: pattern and manifest resolution, atomic tar writing, a peek at the first record.

Writers never leave a half shard behind: each shard is written to ``<name>.tmp`` and renamed with
``os.replace`` once complete, and a failed conversion removes its open ``.tmp``. Readers accept brace
patterns (``train-{000000..000009}.tar``), globs, lists of either, and the converter's ``manifest.json``;
local or remote (any URL webdataset's ``gopen`` opens: ``http(s)://``, ``gs://``, ``pipe:<command>``, ...).
A remote manifest's relative shard names are resolved against its own URL, as local ones against its
directory.
"""

from __future__ import annotations

import glob
import io
import json
import os
import tarfile
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urljoin

import braceexpand
from webdataset.gopen import gopen

MANIFEST_NAME = "manifest.json"
_GLOB_CHARS = "*?["


@dataclass
class ShardSet:
    """Resolved shard URLs; ``num_samples`` is known only when every source was a manifest, ``turns`` (the
    turn count of every record, written by the converter) only when every manifest states the same one."""

    urls: list[str]
    num_samples: int | None
    turns: int | None = None


def is_remote(url: str) -> bool:
    """A URL for webdataset's ``gopen`` (a scheme, or a ``pipe:`` command) rather than a local path."""
    return "://" in url or url.startswith("pipe:")


MAX_MANIFEST_BYTES = 256 << 20  # a manifest of millions of shards is ~100 MB; anything larger is not one


def read_remote(url: str, limit: int = MAX_MANIFEST_BYTES) -> bytes:
    """The whole object at ``url`` (through ``gopen``: curl for http(s), the command for ``pipe:``)."""
    try:
        with gopen(url, "rb") as stream:
            data = stream.read(limit + 1)
    except (OSError, ValueError) as e:  # curl's exit status (22: an HTTP error such as 404), an unknown scheme
        raise FileNotFoundError(f"{url} could not be read ({' '.join(str(e).split())}); check the URL, that "
                                "the server is up and that its tools (curl, gsutil, ...) are installed") from None
    if len(data) > limit:
        raise ValueError(f"{url} is larger than {limit} bytes; is it really a manifest?")
    return data


def _shard_url(manifest: str, name: str) -> str:
    if is_remote(name):
        return name
    if not is_remote(manifest):
        return str(Path(manifest).parent / name)
    if manifest.startswith("pipe:"):
        raise ValueError(f"manifest {manifest} lists the relative shard name {name!r}; a manifest read through "
                         "pipe: has no base to resolve it: list absolute shard URLs, or serve it over http(s)")
    return urljoin(manifest, name)


def read_manifest(path: str | os.PathLike) -> ShardSet:
    """Read a converter manifest (a local path or a URL); shard names are relative to the manifest's directory
    (its URL). Local shards must exist; remote ones are checked when they are read."""
    path = str(path)
    if is_remote(path):
        raw = read_remote(path)
    elif not os.path.isfile(path):
        raise FileNotFoundError(f"manifest {path} does not exist; run `muco data convert` or fix the path")
    else:
        raw = Path(path).read_bytes()
    try:
        obj = json.loads(raw.decode("utf-8"))
        shards = obj["shards"]
        names = [s["name"] for s in shards]
        counts = [int(s["num_samples"]) for s in shards]
        if not names or not all(isinstance(n, str) and n for n in names) or min(counts) < 0:
            raise ValueError("needs a non-empty 'shards' list of {name, num_samples >= 0}")
    except (ValueError, KeyError, TypeError) as e:  # UnicodeDecodeError is a ValueError
        raise ValueError(
            f"manifest {path} is invalid ({e}); expected {{'shards': [{{'name': ..., 'num_samples': ...}}], "
            f"'num_samples': ...}} as written by `muco data convert`; re-run the conversion"
        ) from None
    urls = [_shard_url(path, n) for n in names]
    missing = [u for u in urls if not is_remote(u) and not os.path.exists(u)]
    if missing:
        raise FileNotFoundError(
            f"manifest {path} lists {len(missing)} shard(s) that do not exist, e.g. {missing[0]}; "
            "the shards were moved or the conversion did not finish"
        )
    turns = obj.get("turns")
    return ShardSet(urls, sum(counts), turns if isinstance(turns, int) and turns > 0 else None)


def expand_pattern(pattern: str) -> ShardSet:
    """One source: a manifest path, or a brace pattern whose pieces are literal paths, globs or URLs."""
    if not isinstance(pattern, str) or not pattern:
        raise ValueError(f"shard pattern must be a non-empty string, got {pattern!r}")
    if pattern.endswith(".json"):
        return read_manifest(pattern)
    urls: list[str] = []
    missing: list[str] = []
    for piece in braceexpand.braceexpand(pattern):
        if is_remote(piece):
            urls.append(piece)
        elif any(c in piece for c in _GLOB_CHARS):
            urls.extend(sorted(glob.glob(piece)))
        elif os.path.isfile(piece):
            urls.append(piece)
        else:
            missing.append(piece)
    if not urls:
        raise FileNotFoundError(
            f"no shard matched {pattern!r}; check the directory and the brace range / glob "
            "(or point at the manifest.json written by `muco data convert`)"
        )
    if missing:
        raise FileNotFoundError(
            f"{len(missing)} shard(s) of {pattern!r} do not exist, e.g. {missing[0]}; fix the brace range"
        )
    return ShardSet(urls, None)


def resolve_shards(spec: str | list[str]) -> ShardSet:
    """The union of one or several patterns / manifests (one data source)."""
    parts = [spec] if isinstance(spec, str) else list(spec)
    if not parts:
        raise ValueError("no shard pattern given; set data.train_shards (pattern, list or manifest.json)")
    sets = [expand_pattern(p) for p in parts]
    counts = [s.num_samples for s in sets]
    total = None if any(c is None for c in counts) else sum(counts)  # type: ignore[arg-type]
    turns = {s.turns for s in sets}
    return ShardSet([u for s in sets for u in s.urls], total, turns.pop() if len(turns) == 1 else None)


def peek_first_json(url: str) -> tuple[str, bytes] | None:
    """(key, bytes) of the first ``*.json`` member of a shard (local or remote: only its first members are
    read), or None if it has none."""
    with gopen(url, "rb") as stream, tarfile.open(fileobj=stream, mode="r|*") as tar:
        for info in tar:
            if info.isreg() and info.name.endswith(".json"):
                f = tar.extractfile(info)
                return info.name.rsplit(".", 1)[0].split(".", 1)[0], f.read() if f else b""
    return None


class ShardWriter:
    """Writes samples into size-capped tar shards named ``pattern % index``, each atomically."""

    def __init__(self, pattern: str, max_samples: int = 1000, max_bytes: int = 1 << 30) -> None:
        if "%" not in pattern:
            raise ValueError(f"output pattern {pattern!r} needs a %-index, e.g. out/train-%06d.tar")
        if max_samples < 1 or max_bytes < 1:
            raise ValueError("max_samples and max_bytes must be >= 1")
        self.pattern, self.max_samples, self.max_bytes = pattern, max_samples, max_bytes
        self.shards: list[dict] = []
        self._tar: tarfile.TarFile | None = None
        self._tmp = self._final = ""
        self._count = self._bytes = 0

    def write(self, key: str, members: list[tuple[str, bytes]]) -> None:
        """Add one sample: ``members`` are (extension, payload) pairs stored as ``{key}.{ext}``."""
        size = sum(512 + (len(d) + 511) // 512 * 512 for _, d in members)  # tar header + padded data
        if self._tar is not None and (
            self._count >= self.max_samples or self._bytes + size > self.max_bytes
        ):
            self._finish()
        if self._tar is None:
            self._open()
        for ext, data in members:
            info = tarfile.TarInfo(f"{key}.{ext}")
            info.size, info.mode, info.mtime = len(data), 0o444, 0  # mtime 0: reproducible shards
            self._tar.addfile(info, io.BytesIO(data))  # type: ignore[union-attr]
        self._count += 1
        self._bytes += size

    def close(self) -> list[dict]:
        if self._tar is not None:
            self._finish()
        return self.shards

    def abort(self) -> None:
        """Drop the shard being written (finished shards stay: each is complete)."""
        if self._tar is not None:
            self._tar.close()
            self._tar = None
            Path(self._tmp).unlink(missing_ok=True)

    def __enter__(self) -> ShardWriter:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()

    def _open(self) -> None:
        self._final = self.pattern % len(self.shards)
        Path(self._final).parent.mkdir(parents=True, exist_ok=True)
        self._tmp = self._final + ".tmp"
        self._tar = tarfile.open(self._tmp, mode="w", format=tarfile.USTAR_FORMAT)
        self._count = self._bytes = 0

    def _finish(self) -> None:
        assert self._tar is not None
        self._tar.close()
        self._tar = None
        os.replace(self._tmp, self._final)
        self.shards.append({"name": self._final, "num_samples": self._count,
                            "bytes": os.path.getsize(self._final)})


def write_manifest(path: str | os.PathLike, shards: list[dict], **extra: object) -> Path:
    """Write ``manifest.json`` atomically; shard names are stored relative to its directory."""
    path = Path(path)
    rel = [{**s, "name": os.path.relpath(s["name"], path.parent)} for s in shards]
    obj = {"shards": rel, "num_samples": sum(s["num_samples"] for s in shards), **extra}
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=1) + "\n", encoding="utf-8")
    os.replace(tmp, path)
    return path
