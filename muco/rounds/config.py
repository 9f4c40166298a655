"""The rounds file of `muco rounds`: which fit config each round trains, what it mines, and its schedules.

A plain YAML file (read with ``yaml.safe_load``, never executed)::

    run_dir: runs/demo_rounds            # every round's checkpoint, mined sidecar and eval results go here
    fit:
      config: [configs/demo.yaml]        # the `muco fit` config(s) every round trains with
      args: []                           # extra `muco fit` arguments for every round
      launcher: []                       # command prefix for the fit, e.g. [srun, --ntasks-per-node=8]
    rounds:                              # round 1 learns from in-batch negatives only
      - {max_steps: 400}
      - {max_steps: 200, args: []}       # per-round `muco fit` arguments
    negatives:
      schedule:                          # difficulty schedule: rank band (1 = hardest kept) per round
        - {from_round: 2, band: [30, 100], per_turn: 1}
        - {from_round: 3, band: [5, 30], per_turn: 1}
      mine: {shards: data/demo/train/manifest.json, top_k: 100, margin: 0.05, args: []}
      remine: true                       # false: mine once (after the round before the first stage) and
                                         # train every later round with that sidecar ("static" negatives)
    temperature: {mode: cosine, tau_start: 0.05, tau_end: 0.02}   # optional: tau per round, over the rounds
    eval: {tasks: data/demo/eval/tasks.yaml, args: []}            # optional: `muco eval` after every round

Round r > 1 starts from round r-1's last checkpoint (``model.init_from``: its weights, a fresh optimizer and
schedule); it trains with the negatives mined by round r-1's model when the schedule gives it a band. With
``negatives.remine: false`` only the round before the schedule's first stage mines, and every later round draws
from that one sidecar (its own band still comes from the schedule).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from muco.losses.temperature import TemperatureSchedule
from muco.rounds.schedule import DifficultySchedule

__all__ = ["RoundsConfig", "RoundSpec", "MineSpec", "round_temperatures"]


class RoundsConfigError(ValueError):
    """A rounds file that cannot run; the message names the key and the fix."""


def _str_list(value: Any, key: str) -> list[str]:
    if value is None:
        return []
    if isinstance(value, str):
        return [value]
    if not isinstance(value, list) or not all(isinstance(v, (str, int, float)) for v in value):
        raise RoundsConfigError(f"{key} must be a list of strings, got {value!r}")
    return [str(v) for v in value]


def _mapping(value: Any, key: str, known: set[str]) -> dict[str, Any]:
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise RoundsConfigError(f"{key} must be a mapping, got {value!r}")
    unknown = set(value) - known
    if unknown:
        raise RoundsConfigError(f"{key}: unknown keys {sorted(unknown)}; expected some of {sorted(known)}")
    return value


@dataclass(frozen=True)
class RoundSpec:
    max_steps: int
    args: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class MineSpec:
    shards: list[str]
    top_k: int = 100
    margin: float = 0.05
    args: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class RoundsConfig:
    run_dir: Path
    fit_configs: list[str]
    fit_args: list[str]
    rounds: list[RoundSpec]
    fit_launcher: list[str] = field(default_factory=list)
    schedule: DifficultySchedule | None = None
    mine: MineSpec | None = None
    temperature: dict[str, Any] | None = None
    eval_tasks: str | None = None
    eval_args: list[str] = field(default_factory=list)
    remine: bool = True

    @classmethod
    def load(cls, path: str | Path) -> RoundsConfig:
        path = Path(path)
        if not path.is_file():
            raise RoundsConfigError(f"rounds file {path} does not exist")
        raw = yaml.safe_load(path.read_text())
        return cls.from_dict(raw, source=str(path))

    @classmethod
    def from_dict(cls, raw: Any, source: str = "<dict>") -> RoundsConfig:
        top = _mapping(raw, source, {"run_dir", "fit", "rounds", "negatives", "temperature", "eval"})
        if "run_dir" not in top:
            raise RoundsConfigError(f"{source}: set run_dir (where the rounds' checkpoints and results go)")
        fit = _mapping(top.get("fit"), "fit", {"config", "args", "launcher"})
        configs = _str_list(fit.get("config"), "fit.config")
        if not configs:
            raise RoundsConfigError(f"{source}: set fit.config to the `muco fit` config(s) the rounds train with")
        rounds_raw = top.get("rounds")
        if not isinstance(rounds_raw, list) or not rounds_raw:
            raise RoundsConfigError(f"{source}: rounds must be a non-empty list like [{{max_steps: 400}}, ...]")
        rounds = []
        for i, r in enumerate(rounds_raw, start=1):
            r = _mapping(r, f"rounds[{i}]", {"max_steps", "args"})
            steps = r.get("max_steps")
            if not isinstance(steps, int) or steps < 1:
                raise RoundsConfigError(f"rounds[{i}].max_steps must be a positive integer, got {steps!r}")
            rounds.append(RoundSpec(steps, _str_list(r.get("args"), f"rounds[{i}].args")))

        negs = _mapping(top.get("negatives"), "negatives", {"schedule", "mine", "remine"})
        schedule = mine = None
        remine = negs.get("remine", True)
        if not isinstance(remine, bool):
            raise RoundsConfigError(f"negatives.remine must be true or false, got {remine!r}")
        if negs:
            try:
                schedule = DifficultySchedule(negs.get("schedule") or [])
            except (TypeError, ValueError) as e:
                raise RoundsConfigError(f"negatives.schedule: {e}") from e
            m = _mapping(negs.get("mine"), "negatives.mine", {"shards", "top_k", "margin", "args"})
            shards = _str_list(m.get("shards"), "negatives.mine.shards")
            if not shards:
                raise RoundsConfigError("negatives.mine.shards: name the training shards to mine negatives for")
            mine = MineSpec(shards, int(m.get("top_k", 100)), float(m.get("margin", 0.05)),
                            _str_list(m.get("args"), "negatives.mine.args"))
            needs = max((s.from_round for s in schedule.stages), default=0)
            if needs > len(rounds):
                raise RoundsConfigError(f"negatives.schedule has a stage from round {needs} but only "
                                        f"{len(rounds)} rounds are listed")

        temp = _mapping(top.get("temperature"), "temperature", {"mode", "tau_start", "tau_end"}) or None
        if temp is not None:
            round_temperatures(temp, len(rounds))  # validates
        ev = _mapping(top.get("eval"), "eval", {"tasks", "args"})
        return cls(Path(top["run_dir"]), configs, _str_list(fit.get("args"), "fit.args"), rounds,
                   _str_list(fit.get("launcher"), "fit.launcher"), schedule, mine, temp, ev.get("tasks"),
                   _str_list(ev.get("args"), "eval.args"), remine)

    def first_negatives_round(self) -> int | None:
        """The first round that trains with mined negatives (None: none does)."""
        return None if self.schedule is None else self.schedule.first_round()

    def needs_mining_after(self, r: int) -> bool:
        """Whether round r's model mines negatives: round r+1 trains with them (with ``remine: false``, only the
        round before the first one with negatives mines)."""
        return self.schedule is not None and r < len(self.rounds) and self.schedule.mines_after(r, self.remine)

    def sidecar_round(self, r: int) -> int:
        """Whose model mined the negatives round r trains with: r-1, or with ``remine: false`` the round before
        the first one with negatives."""
        return r - 1 if self.schedule is None else self.schedule.sidecar_round(r, self.remine)


def round_temperatures(spec: dict[str, Any], n_rounds: int) -> list[float]:
    """τ of each round: ``mode`` (constant | linear | cosine) from ``tau_start`` (round 1) to ``tau_end`` (last
    round), constant within a round (anneal within a round with ``model.temperature_schedule``)."""
    try:
        sched = TemperatureSchedule(spec.get("mode", "constant"), float(spec["tau_start"]),
                                    float(spec.get("tau_end", spec["tau_start"])), max(1, n_rounds - 1))
    except KeyError as e:
        raise RoundsConfigError("temperature needs tau_start (and tau_end unless mode is constant)") from e
    except ValueError as e:
        raise RoundsConfigError(f"temperature: {e}") from e
    return [sched.value(r) for r in range(n_rounds)]
