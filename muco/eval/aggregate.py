"""MMEB aggregation and the result table.

A meta-task score is the unweighted mean of its datasets; IND / OOD average their datasets; Overall is the
unweighted mean over **all datasets**, not over the meta-task scores (docs/method.md §12: for MuCo-7B,
(68.3*10 + 71.9*10 + 73.7*12 + 90.9*4) / 36 = 73.6).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from muco.eval.metrics import PRIMARY
from muco.eval.tasks import META_TASKS, SPLITS, TaskSpec

META_LABELS = {"classification": "Classification", "vqa": "VQA", "retrieval": "Retrieval",
               "grounding": "Visual grounding"}


def _group(scores: Mapping[str, float], members: Sequence[TaskSpec]) -> dict:
    values = [scores[s.name] for s in members if s.name in scores]
    missing = [s.name for s in members if s.name not in scores]
    return {"score": sum(values) / len(values) if values else None, "n": len(values), "expected": len(members),
            "partial": bool(missing), "missing": missing}


def aggregate(scores: Mapping[str, float], specs: Sequence[TaskSpec]) -> dict:
    """Group means over the datasets of ``specs`` that have a score.

    Each group reports ``score`` (the mean over its scored datasets; None when none is), ``n`` (datasets scored),
    ``expected`` (datasets in the task list), ``partial`` (n < expected) and ``missing`` (the names not scored,
    in task-list order), so a partial run is visible as such and never reads as a full one.
    """
    unknown = set(scores) - {s.name for s in specs}
    if unknown:
        raise ValueError(f"scores for tasks not in the task list: {sorted(unknown)}")
    out = {"meta_tasks": {}, "splits": {}}
    for m in META_TASKS:
        out["meta_tasks"][m] = _group(scores, [s for s in specs if s.meta_task == m])
    for sp in SPLITS:
        out["splits"][sp] = _group(scores, [s for s in specs if s.split == sp])
    out["overall"] = _group(scores, specs)
    return out


def _pct(x: float | None) -> str:
    return "-" if x is None else f"{100 * x:.1f}"


def _render(rows: list[list[str]], right: set[int]) -> list[str]:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    def cell(i: int, c: str) -> str:
        return c.rjust(widths[i]) if i in right else c.ljust(widths[i])

    return ["  ".join(cell(i, c) for i, c in enumerate(r)).rstrip() for r in rows]


def format_table(results: Mapping[str, Mapping[str, float]], specs: Sequence[TaskSpec],
                 metrics: Sequence[str] = (PRIMARY, "hit@5", "mrr", "ndcg@10"),
                 failed: Mapping[str, str] | None = None) -> str:
    """Plain-text table: one row per dataset (grouped by meta-task), then the aggregate rows (x100).

    ``failed`` (task name -> one-line message) marks those rows FAILED and lists the messages under the table;
    a partial aggregate says which datasets it leaves out.
    """
    failed = failed or {}
    metrics = (PRIMARY, *[m for m in metrics if m != PRIMARY])  # aggregates go under the first column
    header = ["dataset", "meta-task", "split", *metrics]
    rows = [header]
    for m in META_TASKS:
        for s in specs:
            if s.meta_task == m:
                r = results.get(s.name)
                cells = [_pct(r.get(k) if r else None) for k in metrics]
                if s.name in failed and not r:
                    cells[0] = "FAILED"
                rows.append([s.name, m, s.split.upper(), *cells])
    agg = aggregate({k: v[PRIMARY] for k, v in results.items() if PRIMARY in v}, specs)
    blank = [""] * (len(metrics) - 1)
    groups = [(META_LABELS[m], agg["meta_tasks"][m]) for m in META_TASKS]
    groups += [(sp.upper(), agg["splits"][sp]) for sp in SPLITS] + [("Overall", agg["overall"])]
    summary = [[f"{label} ({g['n']}/{g['expected']})", "", "", _pct(g["score"]), *blank]
               for label, g in groups]
    lines = _render(rows + summary, right=set(range(3, len(header))))
    rule = "-" * max(len(line) for line in lines)
    n = len(rows)
    notes = []
    if agg["overall"]["partial"]:
        left = agg["overall"]["missing"]
        named = ", ".join(f"{k} (failed)" if k in failed else k for k in left)
        notes.append(f"partial: {agg['overall']['n']} of {agg['overall']['expected']} datasets scored; the aggregates "
                     f"average only those. Not scored: {named}")
    notes += [f"FAILED {k}: {failed[k]}" for k in failed]
    return "\n".join([lines[0], rule, *lines[1:n], rule, *lines[n:], *notes])
