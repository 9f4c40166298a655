"""Rate-limited warnings for skipped samples: a bad shard must be visible in the log without flooding it."""

from __future__ import annotations

import logging
import time

log = logging.getLogger("muco.data")


class SkipLog:
    """Rate-limited warnings: the first few in full, then one per ``interval`` seconds with a count."""

    def __init__(self, first: int = 5, interval: float = 30.0) -> None:
        self.first, self.interval, self.n, self.suppressed, self.last = first, interval, 0, 0, 0.0

    def __call__(self, worker: str, url: str, key: str | None, err: object, total: int) -> None:
        self.n += 1
        now = time.monotonic()
        if self.n > self.first and now - self.last < self.interval:
            self.suppressed += 1
            return
        more = f" ({self.suppressed} similar warnings suppressed)" if self.suppressed else ""
        log.warning("skipped sample %r of shard %s: %s [worker %s, %d skipped so far]%s",
                    key, url, err, worker, total, more)
        self.last, self.suppressed = now, 0
