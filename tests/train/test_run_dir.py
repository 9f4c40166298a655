"""Which checkpoint a restart resumes from (muco.train.run_dir)."""

from __future__ import annotations

import os

import pytest
import torch

from muco.train.run_dir import default_run_dir, newest_checkpoint, resolve_resume


def touch(path, mtime: int, complete: bool = True):
    """A checkpoint-shaped file (torch.save's zip format), or a cut-short one."""
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"global_step": mtime}, path)
    if not complete:
        path.write_bytes(path.read_bytes()[:40])
    os.utime(path, (mtime, mtime))
    return path


def test_the_newest_checkpoint_wins_hpc_or_not(tmp_path):
    assert newest_checkpoint(tmp_path) is None and resolve_resume(tmp_path, None) is None
    last = touch(tmp_path / "checkpoints" / "last.ckpt", 100)
    touch(tmp_path / "checkpoints" / "epoch=0-step=5.ckpt", 50)
    touch(tmp_path / "checkpoints" / ".last.ckpt.abc123.tmp", 500)  # an unfinished save is never resumed
    assert newest_checkpoint(tmp_path) == last
    hpc = touch(tmp_path / "hpc_ckpt_1.ckpt", 200)  # a preemption after the last periodic save
    assert resolve_resume(tmp_path, None) == str(hpc) == resolve_resume(tmp_path, "last")
    os.utime(last, (300, 300))  # a periodic save after the preemption checkpoint
    assert resolve_resume(tmp_path, None) == str(last)
    # a distributed (FSDP2) checkpoint directory counts once it is complete
    dcp = tmp_path / "checkpoints" / "step=20.ckpt"
    (dcp / "__0_0.distcp").parent.mkdir(parents=True)
    (dcp / "__0_0.distcp").write_bytes(b"shard")
    assert resolve_resume(tmp_path, None) == str(last)
    (dcp / ".metadata").write_bytes(b"meta")
    os.utime(dcp, (400, 400))
    assert resolve_resume(tmp_path, None) == str(dcp)
    # a newer file cut short (a save from before atomic writes, a full disk) is passed over
    touch(tmp_path / "hpc_ckpt_2.ckpt", 500, complete=False)
    assert resolve_resume(tmp_path, None) == str(dcp)
    with pytest.raises(ValueError, match="is not a complete checkpoint"):
        resolve_resume(tmp_path, str(tmp_path / "hpc_ckpt_2.ckpt"))


def test_explicit_requests_fail_early_with_the_fix(tmp_path):
    with pytest.raises(FileNotFoundError, match="holds no checkpoint to resume"):
        resolve_resume(tmp_path, "last")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        resolve_resume(tmp_path, str(tmp_path / "nope.ckpt"))
    assert default_run_dir(["configs/m3t_2b.yaml", "configs/strategy/fsdp.yaml"]) == os.path.join("runs", "m3t_2b")
