"""How much mined ranks move between two sidecars of the same shards (e.g. mined with the canonical query turns
and with one epoch's training draws, or with two epochs' draws; ``benchmarks/bench_mining_draws.py``).

Per (sample key, stored turn) present in both, over the turns where at least one side kept a negative:

* ``jaccard@k``: |A_k ∩ B_k| / |A_k ∪ B_k| of the two top-k negative texts (1: the same set; 0: disjoint);
* ``recall@k``: |A_k ∩ B_k| / |A_k|, the share of A's top k that B also ranks in its top k;
* ``mean_abs_rank_change``: |rank_A - rank_B| over every negative both lists kept (all kept ranks, pooled over
  turns; None when no negative is shared), how far a negative that stays moves;
* ``same_rank1``: the share of turns (both with a negative) whose hardest negative is the same text.

A large movement says that one fixed draw mines other negatives than training's draws would: the case for mining
with the draws the next round trains on (``muco mine --query-draws train``).
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from typing import Any

from muco.data.m3t.sidecar import load_sidecar

Mined = Mapping[tuple[str, int], Sequence[Any]]  # (key, stored turn) -> negatives with .text and .rank


def _load(side: str | os.PathLike | Mined) -> Mined:
    return side if isinstance(side, Mapping) else load_sidecar(side)


def rank_movement(a: str | os.PathLike | Mined, b: str | os.PathLike | Mined, k: int = 10) -> dict[str, Any]:
    """Compare sidecars ``a`` and ``b`` (directories, or ``load_sidecar``'s mappings) per (key, turn); see the
    module docstring. Also counts the turns compared and those only one side holds."""
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    a, b = _load(a), _load(b)
    shared = sorted(set(a) & set(b))
    jaccard, recall, moves, same1 = [], [], [], []
    for turn in shared:
        na, nb = list(a[turn]), list(b[turn])
        ta, tb = {n.text for n in na[:k]}, {n.text for n in nb[:k]}
        if not ta and not tb:  # nothing kept on either side: no ranks to compare
            continue
        jaccard.append(len(ta & tb) / len(ta | tb))
        if ta:
            recall.append(len(ta & tb) / len(ta))
        rank_b = {n.text: int(n.rank) for n in nb}
        moves += [abs(int(n.rank) - rank_b[n.text]) for n in na if n.text in rank_b]
        if na and nb:
            same1.append(na[0].text == nb[0].text)

    def mean(xs: Sequence[float]) -> float | None:
        return round(sum(xs) / len(xs), 4) if xs else None

    return {"turns": len(shared), "turns_compared": len(jaccard), "only_a": len(set(a) - set(b)),
            "only_b": len(set(b) - set(a)), f"jaccard@{k}": mean(jaccard), f"recall@{k}": mean(recall),
            "mean_abs_rank_change": mean(moves), "shared_negatives": len(moves), "same_rank1": mean(same1)}


def movement_table(rows: Mapping[str, Mapping[str, Any]], k: int = 10) -> str:
    """A plain-text table of :func:`rank_movement` results, one line per named comparison."""
    cols = ("turns_compared", f"jaccard@{k}", f"recall@{k}", "mean_abs_rank_change", "same_rank1")
    width = max([len("comparison"), *map(len, rows)])
    lines = ["  ".join([f"{'comparison':<{width}}", *(f"{c:>20}" for c in cols)])]
    for name, r in rows.items():
        cells = ["-" if r.get(c) is None else f"{r[c]:.4f}" if isinstance(r[c], float) else str(r[c]) for c in cols]
        lines.append("  ".join([f"{name:<{width}}", *(f"{c:>20}" for c in cells)]))
    return "\n".join(lines)
