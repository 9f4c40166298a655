"""``muco eval``: run an MMEB-format task list on a model and write per-task JSON plus a summary table.

    muco eval --model <exported dir> --tasks configs/eval/mmeb.yaml --output runs/eval/x \\
        [--root /data/mmeb] [--batch-size 16] [--device cuda] [--image-policy eval] [--limit N] [--only A,B]

Per task ``<output>/<task>.json`` (metrics and counts) and ``<task>.pred.jsonl`` (gold rank and top-1 name per
query); ``summary.json`` and ``results.txt`` hold the aggregate. A task whose JSON was written with the same
settings is not run again (``--overwrite`` forces it).

A task that cannot be evaluated (its data missing or malformed, an image missing, truncated or corrupt) does not
stop the others: it is recorded in ``summary.json`` under ``failed`` (one-line message naming the task, row,
column and file) and in ``results.txt``, the aggregate over the other tasks is marked partial (``partial``,
``missing``), and the command exits 1. A failed task has no ``<task>.json``, so the next run retries it (and only
it, when the others are finished). ``--skip-missing`` leaves tasks without data out instead (``skipped``, exit 0).
"""

from __future__ import annotations

import argparse
import functools
import json
import logging
import os
import sys
from collections.abc import Sequence
from pathlib import Path

import torch

from muco.eval.aggregate import aggregate, format_table
from muco.eval.errors import EvalDataError
from muco.eval.harness import TaskResult, evaluate_task
from muco.eval.tasks import TaskSpec, load_task, load_task_list, select_tasks

log = logging.getLogger("muco.eval")


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="muco eval", description="MMEB-format evaluation (docs/method.md §12)")
    p.add_argument("--model", required=True, help="exported model directory (anything load_encoder accepts)")
    p.add_argument("--tasks", required=True, help="task-list YAML, e.g. configs/eval/mmeb.yaml")
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
    p.add_argument("--limit", type=int, default=None, help="first N queries per task (smoke runs)")
    p.add_argument("--skip-missing", action="store_true", help="skip tasks whose data file is missing")
    p.add_argument("--overwrite", action="store_true", help="re-run tasks that already have results")
    p.add_argument("--verbose", action="store_true",
                   help="log each task's result as it finishes and the traceback of a task's failure "
                        "(also with MUCO_DEBUG=1)")
    args = p.parse_args(argv)
    if args.batch_size < 1 or (args.limit is not None and args.limit < 1):
        p.error("--batch-size and --limit must be >= 1")
    return args


def _settings(args: argparse.Namespace) -> dict:
    """What makes a stored result reusable."""
    return {"model": str(Path(args.model).resolve()), "image_policy": args.image_policy, "limit": args.limit,
            "dtype": args.dtype, "autocast": args.autocast}


def _cached(path: Path, settings: dict) -> dict | None:
    if not path.is_file():
        return None
    try:
        stored = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError):
        return None  # an unreadable result is computed again
    return stored if isinstance(stored, dict) and stored.get("settings") == settings else None


def _write_text(path: Path, text: str) -> None:
    """Whole or not at all: a killed run never leaves half a result that a rerun would trust."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


def _write_result(out: Path, result: TaskResult, spec: TaskSpec, settings: dict) -> dict:
    record = {**result.summary(), "meta_task": spec.meta_task, "split": spec.split, "settings": settings}
    _write_text(out / f"{spec.name}.pred.jsonl",
                "".join(json.dumps({"query": i, "gold_rank": rank, "top1": top}) + "\n"
                        for i, (rank, top) in enumerate(zip(result.gold_ranks, result.top1))))
    _write_text(out / f"{spec.name}.json", json.dumps(record, indent=2) + "\n")  # last: marks the task done
    return record


def _failure(spec: TaskSpec, exc: Exception) -> dict:
    """The ``failed`` entry of a task: one-line message, short reason, and the row, column and file if known."""
    if isinstance(exc, EvalDataError):
        record = exc.in_task(spec.name).record()
    else:  # not the data's fault as far as we know (e.g. out of memory): the error's type and first line
        first = (str(exc).strip().splitlines() or [""])[0]
        reason = f"{type(exc).__name__}: {first}" if first else type(exc).__name__
        record = {"message": f"task {spec.name}: {reason}", "reason": reason, "row": None, "column": None,
                  "file": None}
    return {**record, "data": None if spec.data is None else str(spec.data)}


def _encode_fn(args: argparse.Namespace):
    from muco.train.checkpoint import load_encoder

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    autocast = args.autocast or ("bfloat16" if device.startswith("cuda") else "none")
    kw = {} if args.image_policy == "model" else {"image_policy": args.image_policy}
    encoder = load_encoder(args.model, device=device, dtype=args.dtype,
                           autocast_dtype=None if autocast == "none" else autocast, **kw)
    log.info("model %s on %s, image policy %s", args.model, device, encoder.image_policy)
    return functools.partial(encoder.encode_user_texts, batch_size=args.batch_size)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    verbose = args.verbose or os.environ.get("MUCO_DEBUG", "") not in ("", "0")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    all_specs = load_task_list(args.tasks, root=args.root)
    specs = select_tasks(all_specs, args.only.split(",") if args.only else None)
    out = Path(args.output)
    out.mkdir(parents=True, exist_ok=True)
    settings = _settings(args)

    no_data = [s for s in specs if s.data is None or not s.data.exists()]
    skipped: dict[str, str] = {}
    if no_data:
        names = ", ".join(f"{s.name} ({s.data})" for s in no_data)
        if args.skip_missing:
            skipped = {s.name: f"data {s.data} does not exist" for s in no_data}
            print(f"muco eval: skipping {len(no_data)} task(s) without data (--skip-missing): {names}",
                  file=sys.stderr)
        else:  # named once, with the other failures, at the end
            print(f"muco eval: {len(no_data)} task(s) have no data; the other tasks run, and these are reported "
                  "as failed at the end", file=sys.stderr)

    results: dict[str, dict] = {}
    todo = []
    for s in specs:
        if s.name in skipped:
            continue
        stored = None if args.overwrite else _cached(out / f"{s.name}.json", settings)
        if stored is not None:
            results[s.name] = stored["metrics"]
        else:
            todo.append(s)
    if todo:
        reused = f", reusing {len(results)} finished in {out}" if results else ""
        print(f"muco eval: evaluating {len(todo)} task(s){reused}; the table follows when all are done "
              "(--verbose logs each task as it finishes)", file=sys.stderr)

    failed: dict[str, dict] = {}

    def fail(s: TaskSpec, exc: Exception) -> None:
        failed[s.name] = _failure(s, exc)
        for stale in (out / f"{s.name}.json", out / f"{s.name}.pred.jsonl"):  # so the next run retries it
            stale.unlink(missing_ok=True)
        if verbose:  # otherwise the message is printed once, with the others, at the end
            log.error("%s", failed[s.name]["message"], exc_info=exc)

    encode_fn = None  # the model is loaded once the first task's data has loaded
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
                encode_fn = _encode_fn(args)
            try:
                result = evaluate_task(encode_fn, task, batch_size=args.batch_size)
            except Exception as e:  # an image, or e.g. memory, fails this task alone
                fail(s, e)
                continue
            results[s.name] = _write_result(out, result, s, settings)["metrics"]
    finally:
        harness_log.setLevel(level)

    # aggregate against the full list, so a partial run shows n/expected and names what it leaves out
    scores = {k: v["precision@1"] for k, v in results.items()}
    agg = aggregate(scores, all_specs)
    summary = {"metric": "precision@1", **agg, "complete": not agg["overall"]["partial"], "failed": failed,
               "skipped": skipped, "tasks": results, "settings": settings}
    _write_text(out / "summary.json", json.dumps(summary, indent=2) + "\n")
    table = format_table(results, all_specs, failed={k: v["message"] for k, v in failed.items()})
    _write_text(out / "results.txt", table + "\n")
    # on the console each failure's message is printed once, below, on stderr (results.txt keeps it in the table)
    notes = {f"FAILED {k}: {v['message']}" for k, v in failed.items()}
    print("\n".join(line for line in table.split("\n") if line not in notes))
    if not failed:
        return 0
    ran = len(specs) - len(skipped)
    lines = [f"muco eval: {len(failed)} of {ran} task(s) failed; {out / 'summary.json'} lists them under "
             f"\"failed\", and its aggregate covers the {len(results)} scored task(s) only (partial):"]
    lines += [f"  {f['message']}" for f in failed.values()]
    if any(s.name in failed for s in no_data):
        lines.append("  (tasks without data: set --root or the YAML's root:, or pass --skip-missing)")
    if not verbose:
        lines.append("  fix them and run the same command again: only the failed tasks run "
                     "(--verbose or MUCO_DEBUG=1 logs each failure's traceback)")
    print("\n".join(lines), file=sys.stderr)
    return 1


if __name__ == "__main__":
    sys.exit(main())
