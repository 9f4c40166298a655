"""Skipped samples: every one kept in a JSONL file, the first few warned about in full, the rest counted.

A bad shard must be visible in the console without flooding it, and no skip may go unrecorded: each skip is
appended as one JSON line (``{"split", "rank", "worker", "epoch", "raw", "shard", "key", "reason"}``) to the
run directory's ``skipped.jsonl`` (one ``write`` per line on an ``O_APPEND`` file, so the dataloader workers
of every rank can share it), and when a worker's pass ends it says how many warnings it held back. A run
killed and resumed re-reads the samples after its checkpoint, so their skips may appear twice: the same
(split, rank, worker, epoch, raw) identifies one sample.
"""

from __future__ import annotations

import json
import logging
import os
import time
from typing import Any

log = logging.getLogger("muco.data")
SKIP_FILE = "skipped.jsonl"


class SkipLog:
    """Rate-limited warnings (the first ``first`` in full, then one per ``interval`` seconds with the count
    held back) plus the record file ``path`` (None: warnings only)."""

    def __init__(self, first: int = 5, interval: float = 30.0, path: str | None = None) -> None:
        self.first, self.interval, self.path = first, interval, path
        self.n, self.suppressed, self.last = 0, 0, 0.0

    def __call__(self, worker: str, url: str, key: str | None, err: object, total: int,
                 record: dict[str, Any] | None = None) -> None:
        if self.path is not None:
            line = json.dumps({**(record or {}), "worker": worker, "shard": url, "key": key, "reason": str(err)})
            fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
            try:
                os.write(fd, (line + "\n").encode("utf-8"))
            finally:
                os.close(fd)
        self.n += 1
        now = time.monotonic()
        if self.n > self.first and now - self.last < self.interval:
            self.suppressed += 1
            return
        more = f" ({self.suppressed} similar warnings suppressed)" if self.suppressed else ""
        log.warning("skipped sample %r of shard %s: %s [worker %s, %d skipped so far]%s",
                    key, url, err, worker, total, more)
        self.last, self.suppressed = now, 0

    def close(self, worker: str, total: int) -> None:
        """End of a worker's pass: report the warnings held back since the last one shown."""
        if self.suppressed:
            where = f"; all are listed in {self.path}" if self.path else ""
            log.warning("worker %s: %d more skipped samples not shown (%d skipped in this pass)%s", worker,
                        self.suppressed, total, where)
        self.suppressed = 0
