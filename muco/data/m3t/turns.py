"""Per-sample turn drawing (docs/method.md §5): one shared permutation, one candidate query per turn.

The RNG is seeded from (global seed, epoch, sample key) through a stable hash, so the drawn turns do not
depend on the worker, the rank, the shuffle buffer or Python's per-process hash salt: runs are reproducible
and a resumed run draws what an uninterrupted one would have drawn for the same epoch.
"""

from __future__ import annotations

import random
from collections.abc import Mapping, Sequence
from typing import Any, TypeVar

T = TypeVar("T")


def _fields(turn: Any) -> tuple[Sequence[str], str]:
    if isinstance(turn, Mapping):
        return turn["queries"], turn["target"]
    return turn.queries, turn.target


TURN_ORDERS = ("sample", "batch", "stored")


def draw_turns(
    record_turns: Sequence[Any], num_turns: int, rng: random.Random, shuffle: bool = True
) -> tuple[list[str], list[str]]:
    """Draw ``num_turns`` of the record's turns in random order (a random permutation when K equals the
    number of turns, else a random subset in random order); the same order applies to queries and targets,
    so turn k of the query sequence still pairs with turn k of the target sequence.

    With ``shuffle=False`` the drawn subset keeps the stored order (a batch-level order is applied later, see
    :func:`permute_turns`). ``record_turns`` holds :class:`muco.data.m3t.records.Turn` objects or mappings with
    ``queries``/``target``. :func:`draw_turns_indexed` also gives the stored indices of the drawn turns.
    """
    queries, targets, _ = draw_turns_indexed(record_turns, num_turns, rng, shuffle)
    return queries, targets


def draw_turns_indexed(
    record_turns: Sequence[Any], num_turns: int, rng: random.Random, shuffle: bool = True
) -> tuple[list[str], list[str], list[int]]:
    """:func:`draw_turns` plus the stored index (0-based position in the record) of each drawn turn, in drawn
    order; the RNG is consumed exactly as by :func:`draw_turns`, so both draw the same turns."""
    n = len(record_turns)
    if not 1 <= num_turns <= n:
        raise ValueError(f"cannot draw {num_turns} turns from a record with {n} turns")
    order = rng.sample(range(n), num_turns)
    if not shuffle:
        order.sort()
    queries, targets = [], []
    for i in order:
        cands, target = _fields(record_turns[i])
        if not cands:
            raise ValueError(f"turn {i} has no candidate query")
        queries.append(cands[rng.randrange(len(cands))])
        targets.append(target)
    return queries, targets, order


def apply_order(items: Sequence[T], order: Sequence[int]) -> list[T]:
    """``items`` rearranged so that position k holds ``items[order[k]]``."""
    return [items[i] for i in order]


def permute_turns(queries: list[str], targets: list[str], order: Sequence[int]) -> tuple[list[str], list[str]]:
    """Apply one turn order to a sample's queries and targets alike (``turn_order="batch"``); a sample's
    turn indices and negatives follow with :func:`apply_order`."""
    return apply_order(queries, order), apply_order(targets, order)
