"""M-BEIR aggregation and the result table.

Each task (a dataset-task pair, 16 in M-BEIR) scores its primary metric, Recall@5 (Recall@10 for Fashion200K and
FashionIQ). A modality group (S->S, S->M, M->S, M->M) is the unweighted mean of its tasks, and **Overall is the
unweighted mean over all 16 tasks**, not over the four groups, as in UniIR's and the MuCo paper's tables. Check
with the paper's MuCo-2B global numbers: (49.1*8 + 68.2*2 + 41.6*4 + 64.8*2) / 16 = 51.6 (the mean of the group
scores would be 55.9); MuCo-7B: (54.0*8 + 71.6*2 + 47.4*4 + 70.4*2) / 16 = 56.6.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from muco.eval.mbeir.tasks import GROUPS, MBeirTaskSpec


def _group(scores: Mapping[str, float], members: Sequence[MBeirTaskSpec]) -> dict:
    values = [scores[s.name] for s in members if s.name in scores]
    missing = [s.name for s in members if s.name not in scores]
    return {"score": sum(values) / len(values) if values else None, "n": len(values), "expected": len(members),
            "partial": bool(missing), "missing": missing}


def aggregate(scores: Mapping[str, float], specs: Sequence[MBeirTaskSpec]) -> dict:
    """Group means and Overall over the tasks of ``specs`` that have a score (task name -> primary metric).

    Each group reports ``score`` (None when no task of it is scored), ``n``, ``expected``, ``partial`` and
    ``missing``, so a partial run never reads as a full one.
    """
    unknown = set(scores) - {s.name for s in specs}
    if unknown:
        raise ValueError(f"scores for tasks not in the task list: {sorted(unknown)}")
    groups = {g: _group(scores, [s for s in specs if s.group == g]) for g in GROUPS}
    return {"groups": groups, "overall": _group(scores, specs)}


def _pct(x: float | None) -> str:
    return "-" if x is None else f"{100 * x:.1f}"


def format_table(scores: Mapping[str, Mapping[str, float]], specs: Sequence[MBeirTaskSpec], pools: Sequence[str],
                 failed: Mapping[str, str] | None = None) -> str:
    """Plain-text table (x100): one row per task (pool columns), then the four groups and Overall per pool.

    ``scores``: task name -> pool -> primary metric. ``failed`` (task name -> one-line message) marks those rows
    FAILED and lists the messages under the table.
    """
    failed = failed or {}
    rows = [["task", "dataset", "kind", "group", "metric", *pools]]
    for s in specs:
        r = scores.get(s.name, {})
        cells = [_pct(r.get(p)) for p in pools]
        if s.name in failed and not r:
            cells = ["FAILED"] * len(pools)
        rows.append([s.name, s.dataset, s.kind, s.group, s.metric, *cells])
    aggs = {p: aggregate({k: v[p] for k, v in scores.items() if p in v}, specs) for p in pools}
    summary = []
    for label in (*GROUPS, "Overall"):
        per_pool = [aggs[p]["groups"][label] if label in GROUPS else aggs[p]["overall"] for p in pools]
        first = per_pool[0]
        summary.append([f"{label} ({first['n']}/{first['expected']})", "", "", "", "",
                        *[_pct(g["score"]) for g in per_pool]])
    table = rows + summary
    widths = [max(len(r[i]) for r in table) for i in range(len(table[0]))]
    right = set(range(5, len(table[0])))
    lines = ["  ".join(c.rjust(widths[i]) if i in right else c.ljust(widths[i]) for i, c in enumerate(r)).rstrip()
             for r in table]
    rule = "-" * max(len(line) for line in lines)
    n = len(rows)
    notes = []
    for p in pools:
        overall = aggs[p]["overall"]
        if overall["partial"]:
            left = ", ".join(f"{k} (failed)" if k in failed else k for k in overall["missing"])
            notes.append(f"partial ({p} pool): {overall['n']} of {overall['expected']} tasks scored; the aggregates "
                         f"average only those. Not scored: {left}")
    notes += [f"FAILED {k}: {failed[k]}" for k in failed]
    return "\n".join([lines[0], rule, *lines[1:n], rule, *lines[n:], *notes])
