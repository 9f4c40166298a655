"""``muco eval``: run an MMEB-format task list on a model and write per-task JSON plus a summary table.

    muco eval --model <exported dir> --tasks configs/eval/mmeb.yaml --output runs/eval/x \\
        [--root /data/mmeb] [--batch-size 16] [--device cuda] [--image-policy eval] [--limit N] [--only A,B] \\
        [--devices N]

``--devices N`` splits each task's batches over N processes and gathers the embeddings (the results equal one
process's); candidates shared by tasks are encoded once; ``timing.txt`` has the per-task timing table.

Per task ``<output>/<task>.json`` (metrics and counts) and ``<task>.pred.jsonl`` (gold rank and top-1 name per
query); ``summary.json`` and ``results.txt`` hold the aggregate. A task whose JSON was written with the same
settings is not run again (``--overwrite`` forces it).

A task that cannot be evaluated (its data missing or malformed, an image missing, truncated or corrupt) does not
stop the others: it is recorded in ``summary.json`` under ``failed`` (one-line message naming the task, row,
column and file) and in ``results.txt``, the aggregate over the other tasks is marked partial (``partial``,
``missing``), and the command exits 1. A failed task has no ``<task>.json``, so the next run retries it (and only
it, when the others are finished). ``--skip-missing`` leaves tasks without data out instead (``skipped``, exit 0).

M-BEIR (docs/evaluation.md "M-BEIR", :mod:`muco.cli.eval_mbeir`) runs through the same command and the same
options::

    muco eval --benchmark mbeir --tasks configs/eval/mbeir.yaml --model <dir> --output runs/eval/x \\
        [--pool global|local|both] [--limit N] ...
"""

from __future__ import annotations

import argparse
import io
import json
import logging
import os
import sys
from collections.abc import Sequence
from pathlib import Path

import torch

from muco.cli.eval_mbeir import is_mbeir_task_list, main_mbeir
from muco.cli.eval_outputs import (
    failure_record,
    finished_and_todo,
    load_encode_fn,
    report_failures,
    run_settings,
    write_whole,
)
from muco.distributed import rank_world
from muco.eval.aggregate import aggregate, format_table
from muco.eval.harness import EmbeddingCache, TaskResult, evaluate_task
from muco.eval.tasks import TaskSpec, load_task, load_task_list, select_tasks
from muco.eval.timing import TaskTiming, timing_table

log = logging.getLogger("muco.eval")


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="muco eval", description="MMEB-format evaluation (docs/method.md §12), or "
                                "M-BEIR with --benchmark mbeir (§12b)")
    p.add_argument("--model", required=True, help="exported model directory (anything load_encoder accepts)")
    p.add_argument("--tasks", required=True,
                   help="task-list YAML, e.g. configs/eval/mmeb.yaml (configs/eval/mbeir.yaml with --benchmark mbeir)")
    p.add_argument("--output", required=True, help="directory for the per-task JSON and the summary")
    p.add_argument("--root", default=None, help="data root; overrides the YAML's `root:`")
    p.add_argument("--only", default=None, help="comma-separated task names to run (default: all)")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--device", default=None, help="cpu | cuda | cuda:N (default: cuda when available)")
    p.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default=None,
                   help="weights dtype when loading (default: as stored)")
    p.add_argument("--autocast", choices=["none", "bfloat16", "float16"], default=None,
                   help="autocast dtype (default: bfloat16 on cuda, none on cpu)")
    p.add_argument("--image-policy", default="eval",
                   help="image policy preset (docs/method.md §12: `eval`); `model`: the one stored with the model")
    p.add_argument("--limit", type=int, default=None,
                   help="first N queries per task (smoke runs); M-BEIR: also the first N candidates of each pool, "
                        "plus the relevant ones of the kept queries")
    p.add_argument("--benchmark", choices=["mmeb", "mbeir"], default="mmeb",
                   help="mmeb (default): an MMEB-format task list; mbeir: an M-BEIR task list "
                        "(configs/eval/mbeir.yaml)")
    p.add_argument("--pool", choices=["global", "local", "both"], default=None,
                   help="M-BEIR only: rank against the global pool (all tasks' candidates, the paper's headline "
                        "number), each task's local pool, or both (default)")
    p.add_argument("--devices", type=int, default=1,
                   help="processes (DDP: GPUs, or CPU processes on cpu) that split each task's queries and distinct "
                        "candidates and gather the embeddings; the results equal one process's. Under torchrun / "
                        "srun give the processes per node")
    p.add_argument("--skip-missing", action="store_true", help="skip tasks whose data file is missing")
    p.add_argument("--overwrite", action="store_true", help="re-run tasks that already have results")
    p.add_argument("--verbose", action="store_true",
                   help="log each task's result as it finishes and the traceback of a task's failure "
                        "(also with MUCO_DEBUG=1)")
    args = p.parse_args(argv)
    if args.batch_size < 1 or args.devices < 1 or (args.limit is not None and args.limit < 1):
        p.error("--batch-size, --devices and --limit must be >= 1")
    if args.devices > 1 and args.benchmark == "mbeir":
        p.error("--devices > 1 runs MMEB-format task lists; run M-BEIR in one process per pool for now")
    if args.pool is not None and args.benchmark != "mbeir":
        p.error("--pool is an M-BEIR option: add --benchmark mbeir")
    return args


def _write_result(out: Path, result: TaskResult, spec: TaskSpec, settings: dict) -> dict:
    record = {**result.summary(), "meta_task": spec.meta_task, "split": spec.split, "settings": settings}
    write_whole(out / f"{spec.name}.pred.jsonl",
                "".join(json.dumps({"query": i, "gold_rank": rank, "top1": top}) + "\n"
                        for i, (rank, top) in enumerate(zip(result.gold_ranks, result.top1))))
    write_whole(out / f"{spec.name}.json", json.dumps(record, indent=2) + "\n")  # last: marks the task done
    return record


def _launch(args: argparse.Namespace) -> None:
    """With ``--devices N > 1``, start the other N - 1 processes (Lightning Fabric re-runs this command for each;
    under torchrun / srun it joins the processes already started) and point ``args.device`` at this one's."""
    if args.devices == 1:
        return
    from lightning.fabric import Fabric

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    fabric = Fabric(accelerator="cuda" if device.startswith("cuda") else "cpu", devices=args.devices,
                    strategy="ddp")
    fabric.launch()
    args.device = str(fabric.device)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    verbose = args.verbose or os.environ.get("MUCO_DEBUG", "") not in ("", "0")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if args.benchmark == "mbeir":
        return main_mbeir(args, verbose)
    if is_mbeir_task_list(args.tasks):
        print(f"muco eval: {args.tasks} is an M-BEIR task list; add --benchmark mbeir", file=sys.stderr)
        return 2
    try:
        all_specs = load_task_list(args.tasks, root=args.root)
        specs = select_tasks(all_specs, args.only.split(",") if args.only else None)
    except (OSError, ValueError) as e:  # a missing list, an unset MMEB_ROOT, an unknown --only name
        print(f"muco eval: error: {e}", file=sys.stderr)
        return 2
    out = Path(args.output)
    out.mkdir(parents=True, exist_ok=True)
    settings = run_settings(args)
    # every process decides the same tasks from the same files before any is written
    _launch(args)
    rank, world = rank_world()
    lead = rank == 0  # writes the results and talks; the others only encode their share
    quiet = io.StringIO()
    console = sys.stderr if lead else quiet

    no_data = [s for s in specs if s.data is None or not s.data.exists()]
    skipped: dict[str, str] = {}
    if no_data:
        names = ", ".join(f"{s.name} ({s.data})" for s in no_data)
        if args.skip_missing:
            skipped = {s.name: f"data {s.data} does not exist" for s in no_data}
            print(f"muco eval: skipping {len(no_data)} task(s) without data (--skip-missing): {names}",
                  file=console)
        else:  # named once, with the other failures, at the end
            print(f"muco eval: {len(no_data)} task(s) have no data; the other tasks run, and these are reported "
                  "as failed at the end", file=console)

    finished, names = finished_and_todo([s.name for s in specs if s.name not in skipped], out, settings,
                                        args.overwrite)
    results: dict[str, dict] = {k: v["metrics"] for k, v in finished.items()}
    todo = [s for s in specs if s.name in names]
    if todo:
        reused = f", reusing {len(results)} finished in {out}" if results else ""
        procs = f" in {world} processes" if world > 1 else ""
        print(f"muco eval: evaluating {len(todo)} task(s){reused}{procs}; the table follows when all are done "
              "(--verbose logs each task as it finishes)", file=console)

    failed: dict[str, dict] = {}

    def fail(s: TaskSpec, exc: Exception) -> None:
        failed[s.name] = failure_record(s.name, exc, None if s.data is None else str(s.data))
        if not lead:
            return
        for stale in (out / f"{s.name}.json", out / f"{s.name}.pred.jsonl"):  # so the next run retries it
            stale.unlink(missing_ok=True)
        if verbose:  # otherwise the message is printed once, with the others, at the end
            log.error("%s", failed[s.name]["message"], exc_info=exc)

    encode_fn = None  # the model is loaded once the first task's data has loaded
    cache = EmbeddingCache()  # candidates shared by tasks (class names, image pools) are encoded once
    timings: list[TaskTiming] = []
    # each result is printed once, in the table below: the harness's per-task record only with --verbose
    harness_log = logging.getLogger("muco.eval.harness")
    level = harness_log.level
    if not verbose:
        harness_log.setLevel(max(logging.WARNING, level))
    try:
        for s in todo:
            try:
                task = load_task(s, limit=args.limit)
            except Exception as e:  # one task's data must not stop the others
                fail(s, e)
                continue
            if encode_fn is None:
                encode_fn = load_encode_fn(args)
            hits = cache.hits
            try:
                result = evaluate_task(encode_fn, task, batch_size=args.batch_size, cache=cache, progress=lead)
            except Exception as e:  # an image, or e.g. memory, fails this task alone (on every process)
                fail(s, e)
                continue
            timings.append(TaskTiming(s.name, result.num_queries, result.num_candidates,
                                      result.num_candidates - (cache.hits - hits), result.seconds))
            if lead:
                results[s.name] = _write_result(out, result, s, settings)["metrics"]
            else:
                results[s.name] = result.metrics
    finally:
        harness_log.setLevel(level)
    if not lead:
        return 1 if failed else 0

    # aggregate against the full list, so a partial run shows n/expected and names what it leaves out
    scores = {k: v["precision@1"] for k, v in results.items()}
    agg = aggregate(scores, all_specs)
    summary = {"metric": "precision@1", **agg, "complete": not agg["overall"]["partial"], "failed": failed,
               "skipped": skipped, "tasks": results, "settings": settings}
    write_whole(out / "summary.json", json.dumps(summary, indent=2) + "\n")
    table = format_table(results, all_specs, failed={k: v["message"] for k, v in failed.items()})
    write_whole(out / "results.txt", table + "\n")
    # on the console each failure's message is printed once, below, on stderr (results.txt keeps it in the table)
    notes = {f"FAILED {k}: {v['message']}" for k, v in failed.items()}
    print("\n".join(line for line in table.split("\n") if line not in notes))
    if timings:  # the table in a file (and with --verbose on the console), its total on one line
        write_whole(out / "timing.txt", timing_table(timings, world) + "\n")
        q, enc, sec = (sum(t.queries for t in timings), sum(t.encoded for t in timings),
                       sum(t.seconds for t in timings))
        print(timing_table(timings, world) if verbose else
              f"muco eval: encoded {q} queries and {enc} candidates in {sec:.1f} s ({(q + enc) / max(sec, 1e-9):.1f}"
              f" items/s, {world} process{'es' if world > 1 else ''}); per task: {out / 'timing.txt'}",
              file=sys.stderr)
    return report_failures(failed, len(specs) - len(skipped), len(results), out,
                            any(s.name in failed for s in no_data), verbose)


if __name__ == "__main__":
    sys.exit(main())
