"""Hard-negative rounds on the fine-grained benchmark: in-batch vs random vs static / dynamic mined vs curriculum.

    python benchmarks/bench_rounds.py [--arms inbatch,random,static,dynamic,curriculum] [--seeds 3]
        [--steps 150] [--root runs/bench_rounds] [--report-only]

Each arm is a rounds file ``configs/rounds_<arm>.yaml`` (3 rounds of equal steps: every arm trains the same
optimizer steps on the same images, only the negatives differ). For every arm and seed this script writes a copy of
the file under ``<root>/<arm>/seed<s>/`` (its run directory, the seed, ``--steps`` per round), runs
``python -m muco rounds`` on it, then ``muco eval`` on the last round's checkpoint (per-round evaluation is off
unless ``--eval-every-round``: at small scale it would cost as much as the training), and writes ``bench.json``
there. A finished arm/seed (its ``bench.json``) is skipped, an interrupted one continues where it stopped (as
``muco rounds`` does), so the same command resumes. The random arm's sidecar is drawn per seed with
:mod:`muco.rounds.random_negatives`.

The table: per arm, mean ± std over seeds of Precision@1 on FG-I2T, FG-T2I, FG-CLS and their mean, the mean MRR
over the tasks (the early signal: a detail-blind model ranks the truth in the middle of its 7 one-detail-off
distractors, which puts its P@1 far below the 1/8 of uniform random scores), the wall time per arm and seed,
and the mined negatives' mean similarity (positive, rank band 1-10, all kept) over the arm's mining rounds.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import yaml

REPO = Path(__file__).resolve().parents[1]
ARMS = ("inbatch", "random", "static", "dynamic", "curriculum")
TASKS = ("FG-I2T", "FG-T2I", "FG-CLS")
DATA = "data/finegrained"
RANDOM_SIDECAR = "runs/rounds_random/random_negatives"  # the path configs/rounds_random.yaml names


def arm_file(arm: str, seed: int, run_dir: Path, steps: int | None, eval_every_round: bool) -> dict[str, Any]:
    """The arm's rounds file for one seed: its own run directory, seeds, steps; the random sidecar of the seed."""
    raw = yaml.safe_load((REPO / "configs" / f"rounds_{arm}.yaml").read_text())
    raw["run_dir"] = str(run_dir)
    # the model init (backbone.seed), the data order / turn / negative draws (data.seed) and Lightning's seed
    raw["fit"]["args"] = [*raw["fit"].get("args", []), "--seed_everything", str(seed),
                          "--model.init_args.backbone.seed", str(seed), "--data.init_args.seed", str(seed)]
    for r in raw["rounds"]:
        if steps is not None:
            r["max_steps"] = steps
        r["args"] = [a.replace(RANDOM_SIDECAR, str(run_dir / "random_negatives")) for a in r.get("args", [])]
    if not eval_every_round:
        raw.pop("eval", None)
    return raw


def run_arm(arm: str, seed: int, root: Path, steps: int | None, eval_every_round: bool) -> dict[str, Any]:
    run_dir = root / arm / f"seed{seed}"
    done = run_dir / "bench.json"
    if done.is_file():
        print(f"[bench] {arm} seed {seed}: finished earlier, skipped", flush=True)
        return json.loads(done.read_text())
    run_dir.mkdir(parents=True, exist_ok=True)
    times_path = run_dir / "bench_times.json"
    times = json.loads(times_path.read_text()) if times_path.is_file() else {}
    raw = arm_file(arm, seed, run_dir, steps, eval_every_round)
    rounds_yaml = run_dir / "rounds.yaml"
    rounds_yaml.write_text(yaml.safe_dump(raw, sort_keys=False))
    t0 = time.perf_counter()
    if arm == "random" and not (run_dir / "random_negatives" / "manifest.json").is_file():
        subprocess.run([sys.executable, "-m", "muco.rounds.random_negatives", "--shards",
                        f"{DATA}/train/manifest.json", "--output", str(run_dir / "random_negatives"),
                        "--top-k", "30", "--seed", str(seed)], check=True, cwd=REPO)
    print(f"[bench] {arm} seed {seed}: muco rounds --config {rounds_yaml}", flush=True)
    subprocess.run([sys.executable, "-m", "muco", "rounds", "--config", str(rounds_yaml)], check=True, cwd=REPO)
    n_rounds = len(raw["rounds"])
    ckpt = run_dir / f"round{n_rounds}" / "fit" / "checkpoints" / "last.ckpt"
    out = run_dir / "eval"
    if not (out / "summary.json").is_file():
        subprocess.run([sys.executable, "-m", "muco", "eval", "--model", str(ckpt), "--tasks",
                        f"{DATA}/eval/tasks.yaml", "--output", str(out), "--image-policy", "tiny", "--overwrite"],
                       check=True, cwd=REPO)
    # wall time over restarts: what earlier (interrupted) invocations spent plus this one
    times["wall_s"] = round(times.get("wall_s", 0.0) + time.perf_counter() - t0, 1)
    times_path.write_text(json.dumps(times) + "\n")
    tasks = json.loads((out / "summary.json").read_text())["tasks"]
    summary = json.loads((run_dir / "summary.json").read_text())
    result = {"arm": arm, "seed": seed, "steps_per_round": [r["max_steps"] for r in raw["rounds"]],
              "wall_s": times["wall_s"], "eval": {t: tasks[t]["precision@1"] for t in TASKS if t in tasks},
              "mrr": {t: tasks[t].get("mrr") for t in TASKS if t in tasks},
              "rounds": [{"round": r["round"], "eval": r.get("eval"), "times": r.get("times"),
                          "mined": r.get("mined")} for r in summary]}
    if arm == "random":
        side = json.loads((run_dir / "random_negatives" / "manifest.json").read_text())
        result["random_negatives"] = side["summary"]
    done.write_text(json.dumps(result, indent=2) + "\n")
    return result


def _mean_std(xs: list[float]) -> str:
    if not xs:
        return "-"
    if len(xs) == 1:
        return f"{xs[0]:.3f}"
    return f"{statistics.mean(xs):.3f} ± {statistics.stdev(xs):.3f}"


def _mined(res: dict[str, Any], key: str) -> list[float]:
    vals = []
    for r in res.get("rounds", []):
        m = r.get("mined") or {}
        v = (m.get("mean_neg_sim_by_rank") or {}).get("1-10") if key == "neg_1_10" else m.get(key)
        if v is not None:
            vals.append(float(v))
    return vals


def report(root: Path, arms: list[str]) -> str:
    head = ["arm", "seeds", *TASKS, "overall", "MRR", "wall s/seed", "pos_sim", "neg_sim 1-10", "neg_sim"]
    rows = [head]
    for arm in arms:
        results = [json.loads(p.read_text()) for p in sorted((root / arm).glob("seed*/bench.json"))]
        if not results:
            continue
        per_task = {t: [r["eval"][t] for r in results if t in r["eval"]] for t in TASKS}
        overall = [sum(r["eval"].values()) / len(r["eval"]) for r in results if r["eval"]]
        mrr = [sum(v.values()) / len(v) for r in results if (v := {t: x for t, x in r.get("mrr", {}).items()
                                                                  if x is not None})]
        mined = {k: [v for r in results for v in _mined(r, k)] for k in ("mean_pos_sim", "neg_1_10", "mean_neg_sim")}
        rows.append([arm, str(len(results)), *(_mean_std(per_task[t]) for t in TASKS), _mean_std(overall),
                     _mean_std(mrr),
                     f"{statistics.mean(r['wall_s'] for r in results):.0f}",
                     *(f"{statistics.mean(v):.3f}" if v else "-" for v in mined.values())])
    widths = [max(len(r[i]) for r in rows) for i in range(len(head))]
    lines = ["  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths)))
             for r in rows]
    notes = ["P@1 on the held-out FG tasks after the last round; mean ± std over seeds. 0.125 is uniform random",
             "scoring; a model blind to the details scores far lower (the truth is the centre of its 7 distractors,",
             "each one detail off, so noise in any of 7 details beats it): MRR (mean over tasks) moves first.",
             "pos_sim / neg_sim: mean similarity of positives / kept mined negatives over the arm's mining rounds."]
    return "\n".join([*lines, "", *notes])


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--arms", default=",".join(ARMS), help=f"comma-separated, from {','.join(ARMS)}")
    p.add_argument("--seeds", type=int, default=3, help="seeds 0..N-1 per arm")
    p.add_argument("--steps", type=int, default=None, help="optimizer steps per round (default: the rounds file's)")
    p.add_argument("--root", default="runs/bench_rounds", help="run directories <root>/<arm>/seed<s>")
    p.add_argument("--eval-every-round", action="store_true", help="keep the rounds files' per-round eval")
    p.add_argument("--report-only", action="store_true", help="print the table of the finished runs, run nothing")
    args = p.parse_args(argv)
    arms = [a.strip() for a in args.arms.split(",") if a.strip()]
    unknown = set(arms) - set(ARMS)
    if unknown:
        p.error(f"unknown arms {sorted(unknown)}; choose from {', '.join(ARMS)}")
    root = Path(args.root)
    if not root.is_absolute():
        root = REPO / root
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    if not args.report_only:
        if not (REPO / DATA / "eval" / "tasks.yaml").is_file():
            subprocess.run([sys.executable, "-m", "muco.demo", "finegrained", DATA], check=True, cwd=REPO)
        for arm in arms:
            for seed in range(args.seeds):
                run_arm(arm, seed, root, args.steps, args.eval_every_round)
    print("\n" + report(root, arms))
    return 0


if __name__ == "__main__":
    sys.exit(main())
