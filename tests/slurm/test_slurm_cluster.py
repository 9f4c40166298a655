"""`muco slurm submit` on a real (local, two fake nodes) Slurm cluster: a 2-node DDP run, and a preempted one.

Both jobs are 2 nodes x 1 task, CPU, DDP over gloo, of configs/tiny.yaml on the demo shards. The preempted
job gets `scancel --signal=USR1` once it has written its first checkpoint; muco saves an hpc checkpoint at the
next step boundary and requeues the job, Slurm restarts it (SLURM_RESTART_COUNT=1) and the same command
continues from there. Its per-step train/loss must equal, bitwise, an uninterrupted 2-rank run.
"""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.slurm.conftest import REPO, Cluster, clean_env, read_scalars

TINY = str(REPO / "configs" / "tiny.yaml")
BATCH = 4


def fit_overrides(demo: Path, steps: int) -> list[str]:
    return ["--trainer.accelerator", "cpu", "--trainer.strategy", "ddp", "--trainer.max_steps", str(steps),
            "--trainer.log_every_n_steps", "1", "--trainer.enable_progress_bar", "false",
            "--data.init_args.train_shards", str(demo / "train" / "manifest.json"),
            "--data.init_args.val_shards", str(demo / "val" / "manifest.json"),
            "--data.init_args.batch_size", str(BATCH)]


def submit(cluster: Cluster, submit_dir: Path, run_dir: Path, demo: Path, steps: int) -> str:
    """`python -m muco slurm submit` from `submit_dir` (the job's working directory); the job id."""
    proc = subprocess.run(
        [sys.executable, "-m", "muco", "slurm", "submit", "--config", TINY, "--nodes", "2", "--tasks-per-node", "1",
         "--run-dir", str(run_dir), "--", *fit_overrides(demo, steps)],
        cwd=submit_dir, env=cluster.env, capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stderr
    job_id = proc.stdout.strip()
    assert job_id.isdigit(), proc.stdout
    assert (run_dir / "submit.sbatch").is_file()
    return job_id


def slurm_log(run_dir: Path, job_id: str) -> str:
    path = run_dir / f"slurm-{job_id}.out"
    return path.read_text(errors="replace").replace("\r", "\n") if path.exists() else f"(no {path})"


def checkpoints(run_dir: Path) -> list[Path]:
    return sorted(p for p in (run_dir / "checkpoints").glob("*.ckpt") if not p.name.startswith("."))


def losses(run_dir: Path) -> list[tuple[int, float]]:
    return read_scalars(run_dir).get("train/loss", [])


@pytest.mark.slow
def test_two_node_ddp_job_runs_in_the_run_dir(slurm_cluster, demo_data, tmp_path):
    run_dir = tmp_path / "run"
    t0 = time.monotonic()
    job = submit(slurm_cluster, tmp_path, run_dir, demo_data, steps=6)
    try:
        info = slurm_cluster.wait(job, timeout=150)
    finally:
        slurm_cluster.cancel_unfinished(job)
    log = slurm_log(run_dir, job)
    print(f"2-node job {job}: {info.get('JobState')} after {time.monotonic() - t0:.0f} s", file=sys.stderr)
    assert info.get("JobState") == "COMPLETED", f"{info.get('JobState')} {info.get('ExitCode')}\n{log[-4000:]}"
    assert (run_dir / f"slurm-{job}.out").is_file()
    assert "SLURM_RESTART_COUNT=0" in log
    # Lightning's SLURMEnvironment made one rank per node: both named in the log
    assert "GLOBAL_RANK: 0, MEMBER: 1/2" in log and "GLOBAL_RANK: 1, MEMBER: 2/2" in log, log[-4000:]
    assert checkpoints(run_dir), sorted(p.name for p in run_dir.rglob("*"))
    assert list(run_dir.glob("events.out.tfevents.*")), sorted(p.name for p in run_dir.rglob("*"))
    assert len(losses(run_dir)) == 6


STEPS = 14


@pytest.mark.slow
def test_preempted_job_is_requeued_and_matches_an_uninterrupted_run(slurm_cluster, demo_data, tmp_path):
    run_dir, ref_dir = tmp_path / "run", tmp_path / "ref"
    # the uninterrupted 2-rank run, plain DDP outside Slurm, alongside the job (deterministic on CPU either way)
    ref = subprocess.Popen(
        [sys.executable, "-m", "muco", "fit", "--config", TINY, *fit_overrides(demo_data, STEPS),
         "--trainer.devices", "2", "--trainer.num_nodes", "1", "--trainer.default_root_dir", str(ref_dir)],
        cwd=tmp_path, env=clean_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    t0 = time.monotonic()
    job = submit(slurm_cluster, tmp_path, run_dir, demo_data, steps=STEPS)
    try:
        # preempt once training is under way: its first checkpoint (every 5 steps in tiny.yaml) is there
        deadline = time.monotonic() + 150
        while not checkpoints(run_dir):
            state = slurm_cluster.job(job).get("JobState")
            if state not in ("PENDING", "RUNNING", "CONFIGURING") or time.monotonic() > deadline:
                pytest.fail(f"job {job} {state} before its first checkpoint:\n{slurm_log(run_dir, job)[-4000:]}")
            time.sleep(0.1)
        t_signal = time.monotonic()
        slurm_cluster.run("scancel", "--signal=USR1", job)
        info = slurm_cluster.wait(job, timeout=180)
    finally:
        slurm_cluster.cancel_unfinished(job)
    log = slurm_log(run_dir, job)
    print(f"preempted job {job}: {info.get('JobState')} restarts={info.get('Restarts')} after "
          f"{time.monotonic() - t0:.0f} s (signal at {t_signal - t0:.0f} s)", file=sys.stderr)
    ref_out, _ = ref.communicate(timeout=240)
    assert ref.returncode == 0, ref_out[-4000:]

    assert info.get("JobState") == "COMPLETED", f"{info.get('JobState')} {info.get('ExitCode')}\n{log[-4000:]}"
    assert info.get("Restarts") == "1", log[-4000:]
    assert "SLURM_RESTART_COUNT=0" in log and "SLURM_RESTART_COUNT=1" in log, log[-4000:]
    assert list(run_dir.glob("hpc_ckpt_*.ckpt")), sorted(p.name for p in run_dir.rglob("*"))

    got, want = losses(run_dir), losses(ref_dir)
    assert len(want) == STEPS and len({s for s, _ in want}) == STEPS
    assert got == want    # bitwise: float32 values from the events, compared exactly
