"""Run the rounds of a rounds file: fit -> eval -> mine per round, each phase a `muco` subprocess.

Layout under ``run_dir``::

    round1/fit/                     the round's run directory: TensorBoard, config.yaml, checkpoints/last.ckpt
    round1/eval/                    `muco eval` results (summary.json)
    round1/negatives/               `muco mine` sidecar with round 1's model (used by round 2)
    round1/round.json               written when the round is finished: settings, phase times, results
    summary.json                    all finished rounds

With ``negatives.remine: false`` only the round before the first one with negatives mines, and every later round
trains with that sidecar (:meth:`RoundsConfig.sidecar_round`).

Every phase leaves a mark (``round.json``, ``phases.json``, the eval summary, the sidecar manifest), so a stopped
run continues where it stopped: finished rounds and phases are skipped, and an interrupted fit resumes from the
newest checkpoint of its run directory (as every ``muco fit`` does). Phases run as subprocesses, so the printed
commands are exactly what one would run by hand (or submit as jobs) for the same result.
"""

from __future__ import annotations

import json
import shlex
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from muco.rounds.config import RoundsConfig, round_temperatures

__all__ = ["RoundsRunner"]

Runner = Callable[[list[str]], int]


def _run_subprocess(cmd: list[str]) -> int:
    return subprocess.run(cmd, check=False).returncode


class PhaseFailed(RuntimeError):
    pass


class RoundsRunner:
    def __init__(self, cfg: RoundsConfig, run: Runner = _run_subprocess, dry_run: bool = False,
                 python: str = sys.executable) -> None:
        self.cfg, self._run, self.dry_run, self.python = cfg, run, dry_run, python
        self.tau = round_temperatures(cfg.temperature, len(cfg.rounds)) if cfg.temperature else None

    # ---------------------------------------------------------------- paths
    def round_dir(self, r: int) -> Path:
        return self.cfg.run_dir / f"round{r}"

    def last_ckpt(self, r: int) -> Path:
        return self.round_dir(r) / "fit" / "checkpoints" / "last.ckpt"

    def sidecar(self, r: int) -> Path:
        return self.round_dir(r) / "negatives"

    # ---------------------------------------------------------------- commands
    def fit_command(self, r: int) -> list[str]:
        cfg, spec = self.cfg, self.cfg.rounds[r - 1]
        # multi-node runs start one process per GPU through the launcher (srun); single-node DDP needs none
        cmd = [*cfg.fit_launcher, self.python, "-m", "muco", "fit"]
        for c in cfg.fit_configs:
            cmd += ["--config", c]
        cmd += [*cfg.fit_args, *spec.args, "--trainer.max_steps", str(spec.max_steps),
                "--trainer.default_root_dir", str(self.round_dir(r) / "fit")]
        if r > 1:
            cmd += ["--model.init_args.init_from", str(self.last_ckpt(r - 1))]
        if self.tau is not None:
            cmd += ["--model.init_args.temperature", f"{self.tau[r - 1]:.6g}"]
        stage = cfg.schedule.at(r) if cfg.schedule is not None else None
        if stage is not None:
            (lo, hi), per_turn = stage
            cmd += ["--data.init_args.records.init_args.negatives",
                    json.dumps({"sidecar": str(self.sidecar(cfg.sidecar_round(r))), "band": [lo, hi],
                                "per_turn": per_turn})]
        return cmd

    def eval_command(self, r: int) -> list[str]:
        return [self.python, "-m", "muco", "eval", "--model", str(self.last_ckpt(r)), "--tasks",
                str(self.cfg.eval_tasks), "--output", str(self.round_dir(r) / "eval"), *self.cfg.eval_args]

    def mine_command(self, r: int) -> list[str]:
        m = self.cfg.mine
        assert m is not None
        return [self.python, "-m", "muco", "mine", "--model", str(self.last_ckpt(r)), "--shards", *m.shards,
                "--output", str(self.sidecar(r)), "--top-k", str(m.top_k), "--margin", str(m.margin), *m.args]

    # ---------------------------------------------------------------- running
    def _phase(self, name: str, r: int, cmd: list[str], times: dict[str, float]) -> None:
        print(f"\n[rounds] round {r}: {name}\n$ {shlex.join(cmd)}", flush=True)
        if self.dry_run:
            return
        t0 = time.perf_counter()
        code = self._run(cmd)
        if code != 0:
            raise PhaseFailed(f"round {r}: `muco {name}` exited with {code}; fix the cause and run `muco rounds` "
                              "again: finished rounds and phases are kept")
        times[f"{name}_s"] = round(time.perf_counter() - t0, 1)
        phases = self.round_dir(r) / "phases.json"
        phases.write_text(json.dumps(times, indent=2) + "\n")

    def run_round(self, r: int) -> dict[str, Any] | None:
        rd = self.round_dir(r)
        done = rd / "round.json"
        if done.is_file():
            print(f"[rounds] round {r}: finished earlier ({done}), skipped", flush=True)
            return json.loads(done.read_text())
        if not self.dry_run:
            rd.mkdir(parents=True, exist_ok=True)
        phases = rd / "phases.json"
        times: dict[str, float] = json.loads(phases.read_text()) if phases.is_file() else {}
        if "fit_s" not in times:
            self._phase("fit", r, self.fit_command(r), times)
            if not self.dry_run and not self.last_ckpt(r).is_file():
                raise PhaseFailed(f"round {r}: the fit wrote no {self.last_ckpt(r)}; the fit config needs a "
                                  "ModelCheckpoint callback with save_last: true")
        if self.cfg.eval_tasks and "eval_s" not in times:
            self._phase("eval", r, self.eval_command(r), times)
        if self.cfg.needs_mining_after(r) and "mine_s" not in times:
            self._phase("mine", r, self.mine_command(r), times)
        if self.dry_run:
            return None
        result = self._round_result(r, times)
        done.write_text(json.dumps(result, indent=2) + "\n")
        return result

    def _round_result(self, r: int, times: dict[str, float]) -> dict[str, Any]:
        cfg = self.cfg
        stage = cfg.schedule.at(r) if cfg.schedule is not None else None
        out: dict[str, Any] = {
            "round": r, "max_steps": cfg.rounds[r - 1].max_steps, "checkpoint": str(self.last_ckpt(r)),
            "negatives": None if stage is None else {"sidecar": str(self.sidecar(cfg.sidecar_round(r))),
                                                     "band": list(stage[0]), "per_turn": stage[1]},
            "temperature": None if self.tau is None else self.tau[r - 1],
            "times": times,
        }
        summary = self.round_dir(r) / "eval" / "summary.json"
        if summary.is_file():
            tasks = json.loads(summary.read_text()).get("tasks", {})
            out["eval"] = {name: v.get("precision@1") for name, v in tasks.items()}
        manifest = self.sidecar(r) / "manifest.json"
        if manifest.is_file():
            out["mined"] = json.loads(manifest.read_text()).get("summary")
        return out

    def run(self) -> list[dict[str, Any]]:
        results = []
        for r in range(1, len(self.cfg.rounds) + 1):
            res = self.run_round(r)
            if res is not None:
                results.append(res)
        if not self.dry_run:
            self.cfg.run_dir.mkdir(parents=True, exist_ok=True)
            (self.cfg.run_dir / "summary.json").write_text(json.dumps(results, indent=2) + "\n")
        return results


def results_table(results: list[dict[str, Any]]) -> str:
    """One line per round: negatives, τ, P@1 per eval task and their mean, phase times."""
    tasks = sorted({t for r in results for t in (r.get("eval") or {})})
    head = ["round", "negatives", "tau", *tasks, "mean", "fit s", "eval s", "mine s"]
    rows = [head]
    for res in results:
        ev = res.get("eval") or {}
        vals = [ev[t] for t in tasks if ev.get(t) is not None]
        negs = res.get("negatives")
        band = "in-batch" if not negs else f"ranks {negs['band'][0]}-{negs['band'][1]} x{negs['per_turn']}"
        tau = "-" if res.get("temperature") is None else f"{res['temperature']:.4g}"
        t = res.get("times", {})
        rows.append([str(res["round"]), band, tau, *(f"{ev[x]:.3f}" if ev.get(x) is not None else "-" for x in tasks),
                     f"{sum(vals) / len(vals):.3f}" if vals else "-",
                     *(f"{t[k]:.0f}" if k in t else "-" for k in ("fit_s", "eval_s", "mine_s"))])
    widths = [max(len(row[i]) for row in rows) for i in range(len(head))]
    return "\n".join("  ".join(c.rjust(w) if i else c.ljust(w) for i, (c, w) in enumerate(zip(row, widths)))
                     for row in rows)
