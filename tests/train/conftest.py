"""Helpers to run the real `muco` CLI: in a subprocess (never in-process DDP in pytest: its rank 1 reruns pytest),
or in this process for commands that stop before training."""

from __future__ import annotations

import contextlib
import io
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


def run_muco(*args: str, cwd: Path, timeout: int = 240) -> subprocess.CompletedProcess:
    env = dict(os.environ, HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false", PYTHONUNBUFFERED="1")
    env.pop("RANK", None)
    env.pop("WORLD_SIZE", None)
    return subprocess.run([sys.executable, "-m", "muco", *args], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=timeout)


def call_muco(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    """`muco <args>` in this process, for commands that end before training starts (a config error, --help,
    --print_config): what a subprocess would return, without paying the imports (about 10 s) again."""
    from muco.cli import main

    out, err = io.StringIO(), io.StringIO()
    with contextlib.chdir(cwd), contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            code = main(list(args))
        except SystemExit as e:  # argparse errors, --help and --print_config exit
            code = e.code if isinstance(e.code, int) else int(e.code is not None)
    return subprocess.CompletedProcess(["muco", *args], code, out.getvalue(), err.getvalue())


@pytest.fixture
def muco_cli():
    return run_muco


@pytest.fixture
def muco_inprocess(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    return call_muco


def read_scalars(run_dir: Path) -> dict[str, list[tuple[int, float]]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    ea = EventAccumulator(str(run_dir))
    ea.Reload()
    return {tag: [(e.step, e.value) for e in ea.Scalars(tag)] for tag in ea.Tags()["scalars"]}
