"""Webdataset tar shards -> raw samples: consecutive members grouped by key (webdataset's rule: the key is the
member name up to its first dot), ``{"__key__", "__url__", <ext>: bytes, ...}``. Any URL webdataset's ``gopen``
opens works (local paths, ``pipe:``, http)."""

from __future__ import annotations

import re
import tarfile
from collections.abc import Callable, Iterator

from webdataset.gopen import gopen
from webdataset.tariterators import base_plus_ext

MAX_EMPTY_SHARDS = 1000  # shards in a row without a single sample: an empty shard list, not a few empty shards

# on_error(url, key or None, reason): a sample lost to an unreadable tar
ErrorHandler = Callable[[str, "str | None", str], None]

# curl's exit codes a remote shard meets (webdataset reads http(s) through `curl -f`)
CURL_EXITS = {6: "host not found", 7: "connection refused", 18: "transfer cut short", 22: "HTTP error (e.g. 404)",
              28: "timed out", 35: "TLS handshake failed", 56: "connection reset"}


def describe_error(url: str, e: BaseException) -> str:
    """A one-line cause; a failed ``pipe:`` / curl read is told by its exit status instead of webdataset's dump
    of the whole command line."""
    m = re.search(r"exit (\d+) \(read\)", str(e))
    if m is None:
        return f"{type(e).__name__}: {e}"
    code = int(m.group(1))
    what = CURL_EXITS.get(code, "see curl's exit codes") if "://" in url else "the command failed"
    return f"reader exited with status {code}: {what}"


class TarReader:
    """Reads shards one after another. A truncated or corrupt tar costs the sample being read (reported once to
    ``on_error``) and the unreadable tail; the samples before it still arrive. Reading ``MAX_EMPTY_SHARDS``
    shards in a row without a sample raises (e.g. resampled draws over tars without members would spin)."""

    def __init__(self, on_error: ErrorHandler, what: str = "data.train_shards") -> None:
        self.on_error = on_error
        self.what = what  # names the setting in the error, e.g. data.train_shards
        self.empty_shards = 0

    def __call__(self, url: str, wid: str) -> Iterator[dict]:
        current: dict | None = None
        reading: str | None = None  # key of the member being read when an error hits
        self.empty_shards += 1  # until this shard yields a sample
        if self.empty_shards > MAX_EMPTY_SHARDS:
            raise RuntimeError(f"worker {wid}: {MAX_EMPTY_SHARDS} shards in a row held no sample (the last: {url}); "
                               f"the shards are empty or not webdataset tars: check {self.what} / the conversion")
        try:
            with gopen(url, "rb") as stream, tarfile.open(fileobj=stream, mode="r|*") as tar:
                for info in tar:
                    base, ext = base_plus_ext(info.name)
                    if not info.isreg() or base is None:
                        continue
                    reading = base
                    data = tar.extractfile(info).read()  # type: ignore[union-attr]
                    reading = None
                    if current is None or current["__key__"] != base:
                        if current is not None:
                            self.empty_shards = 0
                            yield current
                        current = {"__key__": base, "__url__": url}
                    current[ext.lower()] = data
        except (tarfile.TarError, OSError, EOFError, ValueError) as e:
            if current is not None and reading == current["__key__"]:
                current, reading = None, current["__key__"]  # it lost a member
            self.on_error(url, reading, f"unreadable tar, rest of shard skipped ({describe_error(url, e)})")
        if current is not None:  # complete as far as the tar goes; decoding checks its members
            self.empty_shards = 0
            yield current
