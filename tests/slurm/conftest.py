"""A real single-machine Slurm cluster (tests/slurm/local_cluster.sh) for the tests of this directory.

Brought up once per session, only when a test asks for it; skipped with the reason without root or without
Debian's slurm-wlm + munge (tests/slurm/install.sh installs them).
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
SCRIPT = HERE / "local_cluster.sh"
DAEMONS = ("munged", "mungekey", "slurmctld", "slurmd", "sbatch", "scontrol", "scancel", "sinfo")
TERMINAL = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "BOOT_FAIL", "DEADLINE",
            "PREEMPTED"}


@dataclass(frozen=True)
class Cluster:
    conf: str          # SLURM_CONF
    state_dir: Path
    env: dict          # a clean environment for clients, jobs and `muco` subprocesses

    def run(self, *cmd: str, timeout: int = 30, check: bool = True) -> subprocess.CompletedProcess:
        return subprocess.run(list(cmd), env=self.env, capture_output=True, text=True, timeout=timeout,
                              check=check)

    def job(self, job_id: str) -> dict[str, str]:
        """`scontrol show job` as a dict (Slurm keeps finished jobs for MinJobAge seconds)."""
        out = self.run("scontrol", "show", "job", "-o", job_id, check=False).stdout
        return dict(re.findall(r"(\w+)=(\S*)", out))

    def wait(self, job_id: str, timeout: float) -> dict[str, str]:
        """Poll until the job reaches a final state; the last `scontrol show job` fields."""
        deadline = time.monotonic() + timeout
        while True:
            info = self.job(job_id)
            if info.get("JobState") in TERMINAL or time.monotonic() > deadline:
                return info
            time.sleep(1.0)

    def cancel_unfinished(self, job_id: str) -> None:
        if self.job(job_id).get("JobState") not in TERMINAL:
            self.run("scancel", job_id, check=False)


def clean_env(**extra: str) -> dict:
    env = dict(os.environ, HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false", PYTHONUNBUFFERED="1", **extra)
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "NODE_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(key, None)
    for key in [k for k in env if k.startswith("SLURM_") and k != "SLURM_CONF"]:
        env.pop(key)   # a test run inside a Slurm job must not look like one of our jobs' tasks
    return env


@pytest.fixture(scope="session")
def slurm_cluster():
    if os.geteuid() != 0:
        pytest.skip("the local Slurm cluster needs root (daemons as root, an /etc/hosts line)")
    search = os.pathsep.join([os.environ.get("PATH", ""), "/usr/sbin", "/sbin"])   # daemons: sbin
    missing = [d for d in DAEMONS if shutil.which(d, path=search) is None]
    if missing:
        pytest.skip(f"Slurm not installed ({', '.join(missing)} not found): run `bash tests/slurm/install.sh`")
    # not pytest's tmp dir: munged wants every directory above its socket world-searchable (pytest's is 0700)
    state = Path(tempfile.mkdtemp(prefix="muco-slurm-"))
    state.chmod(0o755)
    t0 = time.monotonic()
    up = subprocess.run(["bash", str(SCRIPT), "up", str(state)], capture_output=True, text=True, timeout=120)
    if up.returncode != 0:
        subprocess.run(["bash", str(SCRIPT), "down", str(state)], capture_output=True, timeout=120)
        shutil.rmtree(state, ignore_errors=True)
        pytest.fail(f"local Slurm cluster did not come up:\n{up.stderr}")
    conf = up.stdout.strip().splitlines()[-1].split("=", 1)[1]
    print(f"\nlocal Slurm cluster up in {time.monotonic() - t0:.1f} s (SLURM_CONF={conf})", file=sys.stderr)
    try:
        yield Cluster(conf=conf, state_dir=state, env=clean_env(SLURM_CONF=conf))
    finally:
        down = subprocess.run(["bash", str(SCRIPT), "down", str(state)], capture_output=True, text=True,
                              timeout=180)
        if down.returncode != 0:
            print(f"local Slurm cluster teardown failed:\n{down.stderr}", file=sys.stderr)
        shutil.rmtree(state, ignore_errors=True)


def read_scalars(run_dir: Path) -> dict[str, list[tuple[int, float]]]:
    """Every scalar series of the TensorBoard events in `run_dir` (all event files: every restart)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    ea = EventAccumulator(str(run_dir))
    ea.Reload()
    return {tag: [(e.step, e.value) for e in ea.Scalars(tag)] for tag in ea.Tags()["scalars"]}
