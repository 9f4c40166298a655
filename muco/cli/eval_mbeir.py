"""``muco eval --benchmark mbeir``: M-BEIR task lists (docs/evaluation.md "M-BEIR"): every task's queries
ranked against the global pool, its local pool or both; Recall@k per pool in ``<task>.json``, the rank of the
first relevant candidate and the top dids in ``<task>.pred.jsonl``, the candidate embeddings in blocks under
``embeddings/`` (a stopped run resumes where the candidate pass stopped). Tasks that share the global pool are
scored together. Options and outputs as :mod:`muco.cli.eval`."""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Callable
from pathlib import Path

import torch
import yaml

from muco.cli.eval_outputs import (
    failure_record,
    finished_and_todo,
    load_encode_fn,
    report_failures,
    run_settings,
    write_whole,
)
from muco.eval.errors import EvalDataError
from muco.eval.mbeir import (
    CandidateStore,
    MBeirConfig,
    MBeirTask,
    MBeirTaskResult,
    MBeirTaskSpec,
    PoolIndex,
    aggregate,
    format_table,
    global_pool_candidates,
    load_mbeir_config,
    load_mbeir_task,
    needs_local_pools,
    read_instructions,
    score_mbeir_task,
    select_mbeir_tasks,
)
from muco.mine.search import chunked_topk

log = logging.getLogger("muco.eval")


def is_mbeir_task_list(path: str) -> bool:
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
    return {**run_settings(args), "benchmark": "mbeir", "pools": list(pools),
            "instruction_choice": config.instruction_choice, "global_pool": glob if "global" in pools else None}


def _write_mbeir_result(out: Path, result: MBeirTaskResult, spec: MBeirTaskSpec, settings: dict) -> dict:
    record = {**result.summary(), "kind": spec.kind, "k": spec.k, "settings": settings}
    pools = list(result.ranks)
    write_whole(out / f"{spec.name}.pred.jsonl",
                "".join(json.dumps({"qid": q, **{p: {"rank": result.ranks[p][i], "top": result.top[p][i]}
                                                 for p in pools}}) + "\n"
                        for i, q in enumerate(result.qids)))
    write_whole(out / f"{spec.name}.json", json.dumps(record, indent=2) + "\n")  # last: marks the task done
    return record


def _mbeir_groups(tasks: list[MBeirTask], pools: tuple[str, ...]) -> list[list[MBeirTask]]:
    """Tasks that share one candidate store: all of them with the global pool, else one task each (then an
    unreadable candidate image fails only its own task)."""
    return [tasks] if "global" in pools else [[t] for t in tasks]


def main_mbeir(args: argparse.Namespace, verbose: bool) -> int:
    """``muco eval --benchmark mbeir`` with parsed ``args``; the exit status (1 when a task failed)."""
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

    results, names = finished_and_todo([s.name for s in specs if s.name not in skipped], out, settings,
                                       args.overwrite)
    todo = [s for s in specs if s.name in names]

    failed: dict[str, dict] = {}

    def fail(s: MBeirTaskSpec, exc: Exception) -> None:
        failed[s.name] = failure_record(s.name, exc, str(s.queries))
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
    aggs = {p: aggregate({k: v[p] for k, v in scores.items() if p in v}, config.tasks) for p in pools}
    summary = {"benchmark": "mbeir", "metric": "recall@5 (recall@10 for Fashion200K and FashionIQ)",
               "pools": aggs, "complete": not any(a["overall"]["partial"] for a in aggs.values()),
               "failed": failed, "skipped": skipped, "tasks": {k: v["metrics"] for k, v in results.items()},
               "settings": settings}
    write_whole(out / "summary.json", json.dumps(summary, indent=2) + "\n")
    table = format_table(scores, config.tasks, pools, failed={k: v["message"] for k, v in failed.items()})
    write_whole(out / "results.txt", table + "\n")
    notes = {f"FAILED {k}: {v['message']}" for k, v in failed.items()}
    print("\n".join(line for line in table.split("\n") if line not in notes))
    return report_failures(failed, len(specs) - len(skipped), len(results), out,
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
            encode_fn = load_encode_fn(args)
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
