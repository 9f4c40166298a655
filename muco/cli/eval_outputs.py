"""What ``muco eval`` writes and reports for either benchmark (:mod:`muco.cli.eval` for MMEB-format task lists,
:mod:`muco.cli.eval_mbeir` for M-BEIR): the settings that make a stored result reusable, whole-or-nothing
files, a failed task's record, the exit status with the failures' messages, and the model's encode function."""

from __future__ import annotations

import argparse
import functools
import json
import logging
import os
import sys
from collections.abc import Callable
from pathlib import Path

import torch

from muco.eval.errors import EvalDataError

log = logging.getLogger("muco.eval")


def run_settings(args: argparse.Namespace) -> dict:
    """What makes a stored result reusable."""
    return {"model": str(Path(args.model).resolve()), "image_policy": args.image_policy, "limit": args.limit,
            "dtype": args.dtype, "autocast": args.autocast}


def cached_result(path: Path, settings: dict) -> dict | None:
    """The task result stored at ``path`` when it was written with ``settings``; else None."""
    if not path.is_file():
        return None
    try:
        stored = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError):
        return None  # an unreadable result is computed again
    return stored if isinstance(stored, dict) and stored.get("settings") == settings else None


def finished_and_todo(names: list[str], out: Path, settings: dict,
                      overwrite: bool) -> tuple[dict[str, dict], list[str]]:
    """The stored results of the named tasks finished in ``out`` with ``settings`` (none with ``overwrite``), and
    the names still to run, in order."""
    finished, todo = {}, []
    for name in names:
        stored = None if overwrite else cached_result(out / f"{name}.json", settings)
        if stored is not None:
            finished[name] = stored
        else:
            todo.append(name)
    return finished, todo


def write_whole(path: Path, text: str) -> None:
    """Whole or not at all: a killed run never leaves half a result that a rerun would trust."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


def failure_record(task: str, exc: Exception, data: str | None) -> dict:
    """The ``failed`` entry of a task: one-line message, short reason, and the row, column and file if known."""
    if isinstance(exc, EvalDataError):
        record = exc.in_task(task).record()
    else:  # not the data's fault as far as we know (e.g. out of memory): the error's type and first line
        first = (str(exc).strip().splitlines() or [""])[0]
        reason = f"{type(exc).__name__}: {first}" if first else type(exc).__name__
        record = {"message": f"task {task}: {reason}", "reason": reason, "row": None, "column": None,
                  "file": None}
    return {**record, "data": data}


def report_failures(failed: dict[str, dict], ran: int, scored: int, out: Path, missing_data: bool,
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


def load_encode_fn(args: argparse.Namespace) -> Callable:
    """The model of ``args.model`` on its device, as ``encode_user_texts`` with the run's batch size."""
    from muco.train.checkpoint import load_encoder

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    autocast = args.autocast or ("bfloat16" if device.startswith("cuda") else "none")
    kw = {} if args.image_policy == "model" else {"image_policy": args.image_policy}
    encoder = load_encoder(args.model, device=device, dtype=args.dtype,
                           autocast_dtype=None if autocast == "none" else autocast, **kw)
    log.info("model %s on %s, image policy %s", args.model, device, encoder.image_policy)
    return functools.partial(encoder.encode_user_texts, batch_size=args.batch_size)
