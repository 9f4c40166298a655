"""Stable seeds: every random choice of the data pipeline comes from a hash of what identifies it (seed, epoch,
rank, worker, sample key, ...), so runs are reproducible whatever the worker, the rank or Python's hash salt, and a
resumed run draws what an uninterrupted one would have drawn."""

from __future__ import annotations

import hashlib
import random


def stable_seed(*parts: object) -> int:
    """A 64-bit seed from the ``str()`` of each part (blake2b; independent of PYTHONHASHSEED)."""
    h = hashlib.blake2b(digest_size=8)
    for p in parts:
        h.update(str(p).encode("utf-8"))
        h.update(b"\x1f")  # separator: ("1", "23") and ("12", "3") must differ
    return int.from_bytes(h.digest(), "little")


def sample_rng(seed: int, epoch: int, key: str) -> random.Random:
    """The per-sample RNG for (global seed, epoch, sample key)."""
    return random.Random(stable_seed("sample", seed, epoch, key))
