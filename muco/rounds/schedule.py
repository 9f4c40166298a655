"""The difficulty schedule of hard-negative rounds: which rank band of the mined negatives (and how many per
turn) each training round draws, easier bands first (docs/recipe.md, hard-negative rounds)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from muco.data.m3t.negatives import Band, NegativesConfig, check_band, check_per_turn


@dataclass(frozen=True)
class Stage:
    from_round: int
    band: Band
    per_turn: int = 1


class DifficultySchedule:
    """Rank band and negatives per turn by training round, e.g. ranks 30-100 in round 2, 5-30 in round 3, 1-10
    after::

        [{"from_round": 2, "band": [30, 100], "per_turn": 1},
         {"from_round": 3, "band": [5, 30], "per_turn": 1},
         {"from_round": 4, "band": [1, 10], "per_turn": 2}]

    Round r uses the last stage whose ``from_round <= r``; before the first stage there are no mined negatives
    (:meth:`at` returns None). Rounds count from 1; ``from_round`` values must be strictly increasing.
    """

    def __init__(self, stages: Sequence[Mapping[str, Any] | Stage]) -> None:
        if isinstance(stages, Mapping) and "stages" in stages:  # {"stages": [...]} form
            stages = stages["stages"]
        if isinstance(stages, (str, bytes, Mapping)) or not isinstance(stages, Sequence):
            raise TypeError(f"a difficulty schedule is a list of stages, got {stages!r}")
        self.stages: list[Stage] = []
        for i, s in enumerate(stages):
            where = f"difficulty schedule stage {i}"
            if not isinstance(s, Stage):
                if not isinstance(s, Mapping):
                    raise TypeError(f"{where}: expected a mapping with from_round/band/per_turn, got {s!r}")
                unknown = set(s) - {"from_round", "band", "per_turn"}
                missing = {"from_round", "band"} - set(s)
                if unknown or missing:
                    raise ValueError(f"{where}: unknown keys {sorted(unknown)}, missing keys {sorted(missing)}; "
                                     "a stage has from_round, band and optionally per_turn")
                r = s["from_round"]
                if isinstance(r, bool) or not isinstance(r, int) or r < 1:
                    raise ValueError(f"{where}: from_round must be an integer >= 1, got {r!r}")
                s = Stage(r, check_band(s["band"], where), check_per_turn(s.get("per_turn", 1), where))
            if self.stages and s.from_round <= self.stages[-1].from_round:
                raise ValueError(f"{where}: from_round {s.from_round} must be greater than the previous stage's "
                                 f"{self.stages[-1].from_round}")
            self.stages.append(s)

    @classmethod
    def coerce(cls, value: DifficultySchedule | Sequence[Mapping[str, Any]] | Mapping[str, Any] | None
               ) -> DifficultySchedule:
        if isinstance(value, cls):
            return value
        return cls([] if value is None else value)  # type: ignore[arg-type]

    def at(self, round_: int) -> tuple[Band, int] | None:
        """``(band, per_turn)`` of training round ``round_`` (1-based), or None: no mined negatives."""
        if isinstance(round_, bool) or not isinstance(round_, int) or round_ < 1:
            raise ValueError(f"rounds count from 1, got {round_!r}")
        current = None
        for s in self.stages:
            if s.from_round <= round_:
                current = (s.band, s.per_turn)
        return current

    def first_round(self) -> int | None:
        """The first round that draws mined negatives (None: no stage)."""
        return self.stages[0].from_round if self.stages else None

    def mines_after(self, round_: int, remine: bool = True) -> bool:
        """Whether round ``round_``'s model mines: the next round draws negatives, and with ``remine=False``
        ("static" negatives) only the round before the first stage mines, once."""
        return self.at(round_ + 1) is not None and (remine or round_ + 1 == self.first_round())

    def sidecar_round(self, round_: int, remine: bool = True) -> int:
        """Whose model mined the negatives round ``round_`` draws: the previous round's, or with
        ``remine=False`` always the round before the first stage's."""
        first = self.first_round()
        return round_ - 1 if remine or first is None else first - 1

    def negatives_for(self, round_: int, sidecar: str | None) -> NegativesConfig | None:
        """The ``data.records.negatives`` config of round ``round_`` with the sidecar mined after the previous round."""
        at = self.at(round_)
        if at is None:
            return None
        if sidecar is None:
            raise ValueError(f"round {round_} draws mined negatives (band {list(at[0])}) but no sidecar was given")
        return NegativesConfig(sidecar=sidecar, band=at[0], per_turn=at[1])

    def to_list(self) -> list[dict[str, Any]]:
        return [{"from_round": s.from_round, "band": list(s.band), "per_turn": s.per_turn} for s in self.stages]

    def __repr__(self) -> str:
        return f"DifficultySchedule({self.to_list()})"
