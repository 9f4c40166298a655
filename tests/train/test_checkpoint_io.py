"""Atomic checkpoint writes: a full filesystem during a save leaves the previous checkpoint intact."""

from __future__ import annotations

import os
import subprocess
import uuid
from pathlib import Path

import pytest
import torch

from muco.train.checkpoint_io import AtomicCheckpointIO


@pytest.fixture
def small_fs(tmp_path):
    """A real 1 MiB tmpfs (root only)."""
    mnt = tmp_path / f"fs-{uuid.uuid4().hex[:6]}"
    mnt.mkdir()
    if os.geteuid() != 0:
        pytest.skip("mounting a small tmpfs needs root")
    res = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(mnt)], capture_output=True, text=True)
    if res.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {res.stderr.strip()}")
    try:
        yield mnt
    finally:
        subprocess.run(["umount", str(mnt)], check=False)


def checkpoint(n_floats: int, step: int) -> dict:
    return {"global_step": step, "state_dict": {"w": torch.arange(n_floats, dtype=torch.float32)}}


def test_full_disk_keeps_the_previous_checkpoint_loadable(small_fs):
    io = AtomicCheckpointIO()
    path = small_fs / "checkpoints" / "last.ckpt"
    io.save_checkpoint(checkpoint(100_000, step=5), path)  # 400 KB: fits
    with pytest.raises(OSError):
        io.save_checkpoint(checkpoint(200_000, step=10), path)  # 800 KB more than the 600 KB left
    loaded = io.load_checkpoint(path, weights_only=True)
    assert loaded["global_step"] == 5 and torch.equal(loaded["state_dict"]["w"], torch.arange(100_000.0))
    assert sorted(p.name for p in path.parent.iterdir()) == ["last.ckpt"], "a temporary file was left behind"


def test_a_save_replaces_the_file_whole(tmp_path):
    io = AtomicCheckpointIO()
    path = Path(tmp_path) / "last.ckpt"
    io.save_checkpoint(checkpoint(10, step=1), path)
    io.save_checkpoint(checkpoint(20, step=2), path)
    assert io.load_checkpoint(path, weights_only=True)["state_dict"]["w"].numel() == 20
    assert [p.name for p in tmp_path.iterdir()] == ["last.ckpt"]
