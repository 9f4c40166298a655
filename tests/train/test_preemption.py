"""SIGUSR1 outside SLURM: the run saves hpc_ckpt_1.ckpt at a step boundary, stops with exit code 0, and the same
command continues it bitwise (the SLURM path with requeue is tested against a real SLURM in tests/slurm/)."""

from __future__ import annotations

import os
import signal
import subprocess
import time

import pytest
import torch

from muco.train.preemption import next_hpc_path
from tests.train.test_resume import env, fit_command, keys_per_step, per_step, run


def test_next_hpc_path_numbers_like_lightning(tmp_path):
    assert next_hpc_path(tmp_path).name == "hpc_ckpt_1.ckpt"
    (tmp_path / "hpc_ckpt_1.ckpt").write_bytes(b"")
    (tmp_path / "hpc_ckpt_7.ckpt").write_bytes(b"")
    assert next_hpc_path(tmp_path).name == "hpc_ckpt_8.ckpt"


@pytest.mark.slow
def test_sigusr1_checkpoints_at_a_step_boundary_and_the_run_continues_exactly(demo_data, tmp_path):
    extra = ["--data.init_args.num_workers=1"]
    ref_dir, run_dir = tmp_path / "uninterrupted", tmp_path / "signalled"
    run(fit_command(demo_data, ref_dir, *extra), tmp_path)
    cmd = fit_command(demo_data, run_dir, *extra)
    proc = subprocess.Popen(cmd, cwd=tmp_path, env=env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            text=True)
    deadline = time.monotonic() + 240
    while not any(run_dir.glob("sample_keys.rank0.jsonl")) and time.monotonic() < deadline:
        assert proc.poll() is None, proc.stderr.read()[-3000:]
        time.sleep(0.1)
    os.kill(proc.pid, signal.SIGUSR1)  # training is under way: steps have been logged
    _, err = proc.communicate(timeout=240)
    assert proc.returncode == 0, err[-3000:]
    hpc = run_dir / "hpc_ckpt_1.ckpt"
    assert hpc.is_file(), err[-3000:]
    stopped_at = torch.load(hpc, map_location="cpu", weights_only=True)["global_step"]
    assert 0 < stopped_at < 14 and "SIGUSR1 received" in err

    run(cmd, tmp_path)  # resumes from hpc_ckpt_1.ckpt, the newest checkpoint of the run directory
    for tag in ("train/loss", "train/lr", "train/grad_norm"):
        assert per_step(run_dir, tag) == per_step(ref_dir, tag), tag
    assert keys_per_step(run_dir) == keys_per_step(ref_dir)
