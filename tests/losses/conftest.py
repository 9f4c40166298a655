"""Fixtures for the loss tests: one shared 2-process gloo run (never init_process_group in pytest itself)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

HELPER = Path(__file__).with_name("_dist_grad_check.py")


@pytest.fixture(scope="session")
def dist_report() -> dict:
    """JSON report of ``_dist_grad_check.py`` (about 4 s), run once and shared by the distributed tests."""
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, str(HELPER)], capture_output=True, text=True, timeout=180, env=env)
    if proc.returncode != 0:
        pytest.fail(
            f"distributed helper failed (rc={proc.returncode}):\n{proc.stdout}\n{proc.stderr[-4000:]}"
        )
    return json.loads(proc.stdout.strip().splitlines()[-1])
