"""``muco eval``: run an MMEB-format task list on a model and write per-task JSON plus a summary table.

    muco eval --model <exported dir> --tasks configs/eval/mmeb.yaml --output runs/eval/x \\
        [--root /data/mmeb] [--batch-size 16] [--device cuda] [--image-policy eval] [--limit N] [--only A,B]

Per task ``<output>/<task>.json`` (metrics and counts) and ``<task>.pred.jsonl`` (gold rank and top-1 name per
query); ``summary.json`` and ``results.txt`` hold the aggregate. A task whose JSON was written with the same
settings is not run again (``--overwrite`` forces it).
"""

from __future__ import annotations

import argparse
import functools
import json
import logging
import sys
from collections.abc import Sequence
from pathlib import Path

import torch

from muco.eval.aggregate import aggregate, format_table
from muco.eval.harness import TaskResult, evaluate_task
from muco.eval.tasks import TaskSpec, load_task, load_task_list, select_tasks

log = logging.getLogger("muco.eval")


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="muco eval", description="MMEB-format evaluation (METHOD.md §12)")
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
                   help="image policy preset (METHOD.md §12: `eval`); `model`: the one stored with the model")
    p.add_argument("--limit", type=int, default=None, help="first N queries per task (smoke runs)")
    p.add_argument("--skip-missing", action="store_true", help="skip tasks whose data file is missing")
    p.add_argument("--overwrite", action="store_true", help="re-run tasks that already have results")
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
    stored = json.loads(path.read_text())
    return stored if stored.get("settings") == settings else None


def _write_result(out: Path, result: TaskResult, spec: TaskSpec, settings: dict) -> dict:
    record = {**result.summary(), "meta_task": spec.meta_task, "split": spec.split, "settings": settings}
    (out / f"{spec.name}.json").write_text(json.dumps(record, indent=2) + "\n")
    with (out / f"{spec.name}.pred.jsonl").open("w", encoding="utf-8") as f:
        for i, (rank, top) in enumerate(zip(result.gold_ranks, result.top1)):
            f.write(json.dumps({"query": i, "gold_rank": rank, "top1": top}) + "\n")
    return record


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    all_specs = load_task_list(args.tasks, root=args.root)
    specs = select_tasks(all_specs, args.only.split(",") if args.only else None)
    missing = [s for s in specs if s.data is None or not s.data.exists()]
    if missing and not args.skip_missing:
        names = ", ".join(f"{s.name} ({s.data})" for s in missing)
        print(f"muco eval: missing data for {len(missing)} task(s): {names}\n"
              "set --root (or the YAML's root:) or pass --skip-missing", file=sys.stderr)
        return 2
    specs = [s for s in specs if s not in missing]
    out = Path(args.output)
    out.mkdir(parents=True, exist_ok=True)
    settings = _settings(args)

    results: dict[str, dict] = {}
    todo = []
    for s in specs:
        stored = None if args.overwrite else _cached(out / f"{s.name}.json", settings)
        if stored is not None:
            log.info("%s: reusing %s", s.name, out / f"{s.name}.json")
            results[s.name] = stored["metrics"]
        else:
            todo.append(s)

    if todo:
        from muco.encoder import load_encoder

        device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
        autocast = args.autocast or ("bfloat16" if device.startswith("cuda") else "none")
        kw = {} if args.image_policy == "model" else {"image_policy": args.image_policy}
        encoder = load_encoder(args.model, device=device, dtype=args.dtype,
                               autocast_dtype=None if autocast == "none" else autocast, **kw)
        log.info("model %s on %s, image policy %s", args.model, device, encoder.image_policy)
        encode_fn = functools.partial(encoder.encode_user_texts, batch_size=args.batch_size)
        for s in todo:
            task = load_task(s, limit=args.limit)
            result = evaluate_task(encode_fn, task, batch_size=args.batch_size)
            results[s.name] = _write_result(out, result, s, settings)["metrics"]

    # aggregate against the full list, so a partial run shows n/expected
    scores = {k: v["precision@1"] for k, v in results.items()}
    summary = {"metric": "precision@1", **aggregate(scores, all_specs), "tasks": results,
               "settings": settings}
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    table = format_table(results, all_specs)
    (out / "results.txt").write_text(table + "\n")
    print(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
