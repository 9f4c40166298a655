"""Where an evaluation's time went: per task, the queries and candidates it encoded and their rates."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass


@dataclass(frozen=True)
class TaskTiming:
    """One task's work: ``encoded`` of its ``candidates`` distinct candidates were encoded (the rest came from the
    embedding cache of an earlier task), in ``seconds`` together with its queries."""

    name: str
    queries: int
    candidates: int
    encoded: int
    seconds: float

    @property
    def items_per_s(self) -> float:
        return (self.queries + self.encoded) / self.seconds if self.seconds > 0 else 0.0


def timing_table(timings: Sequence[TaskTiming], processes: int = 1) -> str:
    """A fixed-width table, one task a row, and the total."""
    width = max([len(t.name) for t in timings] + [5])
    head = f"{'task':<{width}}  {'queries':>8}  {'candidates':>10}  {'encoded':>8}  {'seconds':>8}  {'items/s':>8}"
    rows = [head, "-" * len(head)]
    for t in [*timings, TaskTiming("total", sum(t.queries for t in timings), sum(t.candidates for t in timings),
                                   sum(t.encoded for t in timings), sum(t.seconds for t in timings))]:
        rows.append(f"{t.name:<{width}}  {t.queries:>8}  {t.candidates:>10}  {t.encoded:>8}  {t.seconds:>8.1f}  "
                    f"{t.items_per_s:>8.1f}")
    rows.append(f"({processes} process{'es' if processes > 1 else ''}; items/s: queries and encoded candidates per "
                "second, all processes together)")
    return "\n".join(rows)


__all__ = ["TaskTiming", "timing_table"]
