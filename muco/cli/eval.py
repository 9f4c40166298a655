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

M-BEIR (docs/evaluation.md "M-BEIR") runs through the same command and the same options::

    muco eval --benchmark mbeir --tasks configs/eval/mbeir.yaml --model <dir> --output runs/eval/x \\
        [--pool global|local|both] [--limit N] ...

with ``<task>.json`` holding Recall@k per pool, ``<task>.pred.jsonl`` the rank of the first relevant candidate
and the top dids per query and pool, and ``embeddings/`` the candidate embeddings in blocks, so a stopped run
resumes where the candidate pass stopped. Tasks that share the global pool are scored together.
"""

from __future__ import annotations

import argparse
import functools
import io
import json
import logging
import os
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

import torch
import yaml

from muco.distributed import rank_world
from muco.eval.aggregate import aggregate, format_table
from muco.eval.errors import EvalDataError
from muco.eval.harness import EmbeddingCache, TaskResult, evaluate_task
from muco.eval.mbeir import (
    CandidateStore,
    MBeirConfig,
    MBeirTask,
    MBeirTaskResult,
    MBeirTaskSpec,
    PoolIndex,
    global_pool_candidates,
    load_mbeir_config,
    load_mbeir_task,
    needs_local_pools,
    read_instructions,
    score_mbeir_task,
    select_mbeir_tasks,
)
from muco.eval.mbeir import aggregate as mbeir_aggregate
from muco.eval.mbeir import format_table as mbeir_table
from muco.eval.tasks import TaskSpec, load_task, load_task_list, select_tasks
from muco.eval.timing import TaskTiming, timing_table
from muco.mine.search import chunked_topk

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



def _report_failures(failed: dict[str, dict], ran: int, scored: int, out: Path, missing_data: bool,
                     verbose: bool) -> int:
    """The exit status of a run; when tasks failed, their one-line messages and what to do, on stderr."""
    if not failed:
        return 0
    lines = [f"muco eval: {len(failed)} of {ran} task(s) failed; {out / 'summary.json'} lists them under "
             f"\"failed\", and its aggregate covers the {scored} scored task(s) only (partial):"]
    lines += [f"  {f['message']}" for f in failed.values()]
    if missing_data:
        lines.append("  (tasks without data: set --root or the YAML's root:, or pass --skip-missing)")
    if not verbose:
        lines.append("  fix them and run the same command again: only the failed tasks run "
                     "(--verbose or MUCO_DEBUG=1 logs each failure's traceback)")
    print("\n".join(lines), file=sys.stderr)
    return 1

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
    if args.benchmark == "mbeir":
        return _main_mbeir(args, verbose)
    if _is_mbeir_task_list(args.tasks):
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
    settings = _settings(args)
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
        procs = f" in {world} processes" if world > 1 else ""
        print(f"muco eval: evaluating {len(todo)} task(s){reused}{procs}; the table follows when all are done "
              "(--verbose logs each task as it finishes)", file=console)

    failed: dict[str, dict] = {}

    def fail(s: TaskSpec, exc: Exception) -> None:
        failed[s.name] = _failure(s, exc)
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
                encode_fn = _encode_fn(args)
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
    _write_text(out / "summary.json", json.dumps(summary, indent=2) + "\n")
    table = format_table(results, all_specs, failed={k: v["message"] for k, v in failed.items()})
    _write_text(out / "results.txt", table + "\n")
    # on the console each failure's message is printed once, below, on stderr (results.txt keeps it in the table)
    notes = {f"FAILED {k}: {v['message']}" for k, v in failed.items()}
    print("\n".join(line for line in table.split("\n") if line not in notes))
    if timings:  # the table in a file (and with --verbose on the console), its total on one line
        _write_text(out / "timing.txt", timing_table(timings, world) + "\n")
        q, enc, sec = (sum(t.queries for t in timings), sum(t.encoded for t in timings),
                       sum(t.seconds for t in timings))
        print(timing_table(timings, world) if verbose else
              f"muco eval: encoded {q} queries and {enc} candidates in {sec:.1f} s ({(q + enc) / max(sec, 1e-9):.1f}"
              f" items/s, {world} process{'es' if world > 1 else ''}); per task: {out / 'timing.txt'}",
              file=sys.stderr)
    return _report_failures(failed, len(specs) - len(skipped), len(results), out,
                            any(s.name in failed for s in no_data), verbose)



# ---- M-BEIR -------------------------------------------------------------------------------------------------------
def _is_mbeir_task_list(path: str) -> bool:
    """An M-BEIR task list names an instruction table, which an MMEB one never does."""
    try:
        with open(path, encoding="utf-8") as f:
            cfg = yaml.safe_load(f)
    except (OSError, yaml.YAMLError, UnicodeDecodeError):
        return False  # the MMEB loader reports it
    return isinstance(cfg, dict) and "instructions" in cfg


def _mbeir_settings(args: argparse.Namespace, config: MBeirConfig, pools: tuple[str, ...]) -> dict:
    """What makes a stored M-BEIR result reusable: the model settings, the pools and what the global pool is."""
    glob = (str(config.global_pool) if config.global_pool is not None and args.limit is None
            else "union of the local pools of: " + ", ".join(s.name for s in config.tasks))
    return {**_settings(args), "benchmark": "mbeir", "pools": list(pools),
            "instruction_choice": config.instruction_choice, "global_pool": glob if "global" in pools else None}


def _mbeir_failure(spec: MBeirTaskSpec, exc: Exception) -> dict:
    if isinstance(exc, EvalDataError):
        record = exc.in_task(spec.name).record()
    else:
        first = (str(exc).strip().splitlines() or [""])[0]
        reason = f"{type(exc).__name__}: {first}" if first else type(exc).__name__
        record = {"message": f"task {spec.name}: {reason}", "reason": reason, "row": None, "column": None,
                  "file": None}
    return {**record, "data": str(spec.queries)}


def _write_mbeir_result(out: Path, result: MBeirTaskResult, spec: MBeirTaskSpec, settings: dict) -> dict:
    record = {**result.summary(), "kind": spec.kind, "k": spec.k, "settings": settings}
    pools = list(result.ranks)
    _write_text(out / f"{spec.name}.pred.jsonl",
                "".join(json.dumps({"qid": q, **{p: {"rank": result.ranks[p][i], "top": result.top[p][i]}
                                                 for p in pools}}) + "\n"
                        for i, q in enumerate(result.qids)))
    _write_text(out / f"{spec.name}.json", json.dumps(record, indent=2) + "\n")  # last: marks the task done
    return record


def _mbeir_groups(tasks: list[MBeirTask], pools: tuple[str, ...]) -> list[list[MBeirTask]]:
    """Tasks that share one candidate store: all of them with the global pool, else one task each (then an
    unreadable candidate image fails only its own task)."""
    return [tasks] if "global" in pools else [[t] for t in tasks]


def _main_mbeir(args: argparse.Namespace, verbose: bool) -> int:
    try:
        config = load_mbeir_config(args.tasks, root=args.root)
        specs = select_mbeir_tasks(config.tasks, args.only.split(",") if args.only else None)
    except (OSError, ValueError) as e:
        print(f"muco eval: {e}", file=sys.stderr)
        return 2
    pools = ("global", "local") if args.pool in (None, "both") else (args.pool,)
    out = Path(args.output)
    out.mkdir(parents=True, exist_ok=True)
    settings = _mbeir_settings(args, config, pools)
    shared = [("instructions", config.instructions)]
    if "global" in pools and config.global_pool is not None and args.limit is None:
        shared.append(("global pool", config.global_pool))
    for what, path in shared:  # every task needs these: no run without them
        if not path.is_file():
            print(f"muco eval: {what} {path} does not exist; set --root or the task list's root: (now "
                  f"{config.root})", file=sys.stderr)
            return 1

    def data_missing(s: MBeirTaskSpec) -> list[Path]:
        return [p for p in (s.queries, s.pool, s.qrels) if not p.exists()]

    no_data = [s for s in specs if data_missing(s)]
    skipped: dict[str, str] = {}
    if no_data and args.skip_missing:
        skipped = {s.name: f"data {', '.join(map(str, data_missing(s)))} does not exist" for s in no_data}
        print(f"muco eval: skipping {len(no_data)} task(s) without data (--skip-missing): "
              f"{', '.join(skipped)}", file=sys.stderr)

    results: dict[str, dict] = {}
    todo = []
    for s in specs:
        if s.name in skipped:
            continue
        stored = None if args.overwrite else _cached(out / f"{s.name}.json", settings)
        if stored is not None:
            results[s.name] = stored
        else:
            todo.append(s)

    failed: dict[str, dict] = {}

    def fail(s: MBeirTaskSpec, exc: Exception) -> None:
        failed[s.name] = _mbeir_failure(s, exc)
        for stale in (out / f"{s.name}.json", out / f"{s.name}.pred.jsonl"):  # so the next run retries it
            stale.unlink(missing_ok=True)
        if verbose:
            log.error("%s", failed[s.name]["message"], exc_info=exc)

    harness_log = logging.getLogger("muco.eval.mbeir.harness")
    level = harness_log.level
    if not verbose:
        harness_log.setLevel(max(logging.WARNING, level))
    try:
        if todo:
            reused = f", reusing {len(results)} finished in {out}" if results else ""
            print(f"muco eval: M-BEIR, {len(todo)} task(s), pools {'+'.join(pools)}{reused}; the table follows "
                  "when all are done", file=sys.stderr)
            _run_mbeir(args, config, todo, pools, out, settings, results, fail)
    finally:
        harness_log.setLevel(level)

    scores = {k: {p: v["metrics"][p][v["metric"]] for p in pools if p in v["metrics"]} for k, v in results.items()}
    aggs = {p: mbeir_aggregate({k: v[p] for k, v in scores.items() if p in v}, config.tasks) for p in pools}
    summary = {"benchmark": "mbeir", "metric": "recall@5 (recall@10 for Fashion200K and FashionIQ)",
               "pools": aggs, "complete": not any(a["overall"]["partial"] for a in aggs.values()),
               "failed": failed, "skipped": skipped, "tasks": {k: v["metrics"] for k, v in results.items()},
               "settings": settings}
    _write_text(out / "summary.json", json.dumps(summary, indent=2) + "\n")
    table = mbeir_table(scores, config.tasks, pools, failed={k: v["message"] for k, v in failed.items()})
    _write_text(out / "results.txt", table + "\n")
    notes = {f"FAILED {k}: {v['message']}" for k, v in failed.items()}
    print("\n".join(line for line in table.split("\n") if line not in notes))
    return _report_failures(failed, len(specs) - len(skipped), len(results), out,
                            any(s.name in failed for s in no_data), verbose)


def _run_mbeir(args: argparse.Namespace, config: MBeirConfig, todo: list[MBeirTaskSpec], pools: tuple[str, ...],
               out: Path, settings: dict, results: dict[str, dict],
               fail: Callable[[MBeirTaskSpec, Exception], None]) -> None:
    """Load, embed, search and write every task of ``todo``; a task's failure is passed to ``fail``."""
    try:
        instructions = read_instructions(config.instructions)
    except EvalDataError as e:
        for s in todo:
            fail(s, e)
        return
    with_pool = needs_local_pools(config, pools, args.limit)
    tasks: list[MBeirTask] = []
    for s in todo:
        try:
            tasks.append(load_mbeir_task(s, config, instructions, limit=args.limit, with_pool=with_pool))
        except Exception as e:  # one task's data must not stop the others
            fail(s, e)
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    encode_fn = None
    cache_key = json.dumps({k: settings[k] for k in ("model", "image_policy", "dtype", "autocast")})
    for group in _mbeir_groups(tasks, pools):
        if not group:  # every task failed to load
            continue
        store = CandidateStore(config.image_root)
        indexes: dict[str, PoolIndex] = {}
        local_rows = {}
        try:
            glob_rows = None
            if "global" in pools:
                glob = global_pool_candidates(config, {t.name: t for t in tasks}, instructions, args.limit)
                glob_rows = store.add(*glob)
                del glob  # the store keeps what it needs
        except Exception as e:  # the global pool is every task's: all of them fail
            for t in group:
                fail(t.spec, e)
            continue
        alive = []
        for t in group:
            try:
                if "local" in pools:
                    local_rows[t.name] = store.add(t.pool, t.spec.pool)
                alive.append(t)
            except Exception as e:
                fail(t.spec, e)
            t.pool = []  # registered: the store holds the texts from here on
        if not alive:
            continue
        if encode_fn is None:  # the model is loaded once some task's data has loaded
            encode_fn = _encode_fn(args)
        try:
            print(f"muco eval: embedding {len(store)} distinct candidate(s) (blocks cached in {out / 'embeddings'})",
                  file=sys.stderr)
            store.embed(encode_fn, args.batch_size, cache_dir=out / "embeddings", cache_key=cache_key,
                        reuse=not args.overwrite)
            if glob_rows is not None:
                indexes["global"] = PoolIndex.build("global", store, glob_rows, chunked_topk, device)
        except Exception as e:  # a candidate image, or memory: every task of this store fails
            for t in alive:
                fail(t.spec, e)
            continue
        for t in alive:
            try:
                own = dict(indexes)
                if "local" in pools:
                    own["local"] = PoolIndex.build(t.name, store, local_rows[t.name], chunked_topk, device)
                result = score_mbeir_task(encode_fn, t, store, own, batch_size=args.batch_size, device=device)
            except Exception as e:
                fail(t.spec, e)
                continue
            results[t.name] = _write_mbeir_result(out, result, t.spec, settings)


if __name__ == "__main__":
    sys.exit(main())
