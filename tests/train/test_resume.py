"""Exact resume: a run killed with SIGKILL and restarted with the same command continues bitwise identically
(per-step loss, lr, grad norm and sample keys), with 0 and 2 dataloader workers and on 2 DDP ranks; a resume
with another backbone refuses, naming the setting."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from tests.train.conftest import REPO

CONFIG = str(REPO / "configs" / "tiny.yaml")
STEPS = 14  # checkpoints every 5 steps (tiny.yaml): killed after step 5 or 10, resumed from there


def fit_command(demo: Path, run_dir: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "muco", "fit", "--config", CONFIG,
            f"--data.init_args.train_shards={demo}/train/manifest.json",
            f"--data.init_args.val_shards={demo}/val/manifest.json",
            f"--trainer.default_root_dir={run_dir}", f"--trainer.max_steps={STEPS}",
            "--trainer.log_every_n_steps=1", "--trainer.enable_progress_bar=false",
            "--trainer.callbacks+=muco.train.callbacks.SampleKeyLog",
            "--data.init_args.batch_size=4",
            # LoRA with dropout: an unrestored RNG state would change the masks after the resume
            "--model.init_args.backbone.adapter={kind: lora, r: 4, alpha: 8, dropout: 0.1}", *extra]


def env() -> dict[str, str]:
    e = dict(os.environ, HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false", PYTHONUNBUFFERED="1",
             PYTHONPATH=str(REPO))
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "SLURM_JOB_ID", "SLURM_NTASKS"):
        e.pop(k, None)
    return e


def run(cmd: list[str], cwd: Path) -> None:
    res = subprocess.run(cmd, cwd=cwd, env=env(), capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-4000:]


def run_and_kill(cmd: list[str], cwd: Path, run_dir: Path, after_step: int) -> None:
    """Start the run and SIGKILL its whole process group once a checkpoint at >= after_step is on disk."""
    proc = subprocess.Popen(cmd, cwd=cwd, env=env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            start_new_session=True)
    deadline = time.monotonic() + 240
    try:
        while time.monotonic() < deadline:
            assert proc.poll() is None, f"finished before it could be killed: {proc.stderr.read()[-3000:]}"
            last = run_dir / "checkpoints" / "last.ckpt"
            if last.exists() and load_meta(last)["global_step"] >= after_step:
                break
            time.sleep(0.2)
        else:
            pytest.fail("no checkpoint appeared in time")
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=60)


def load_meta(ckpt: Path) -> dict:
    """A checkpoint file, or the non-tensor part of a distributed (FSDP2) checkpoint directory."""
    return torch.load(ckpt / "meta.pt" if ckpt.is_dir() else ckpt, map_location="cpu", weights_only=True)


def per_step(run_dir: Path, tag: str) -> dict[int, float]:
    """``tag`` per step over all event files in write order; a restarted run's value replaces the killed one's."""
    from tensorboard.backend.event_processing.event_file_loader import EventFileLoader
    from tensorboard.util import tensor_util

    out: dict[int, float] = {}
    files = run_dir.glob("events.out.tfevents.*")
    for f in sorted(files, key=lambda p: (int(re.search(r"tfevents\.(\d+)", p.name).group(1)), p.stat().st_mtime)):
        for ev in EventFileLoader(str(f)).Load():
            for v in ev.summary.value:
                if v.tag == tag:
                    out[ev.step] = (v.simple_value if v.HasField("simple_value")
                                    else float(tensor_util.make_ndarray(v.tensor)))
    return out


def keys_per_step(run_dir: Path) -> dict[tuple[int, int], list[str]]:
    out = {}
    for f in run_dir.glob("sample_keys.rank*.jsonl"):
        for line in f.read_text().splitlines():
            try:
                rec = json.loads(line)
            except json.JSONDecodeError:  # a line cut by the kill
                continue
            out[(rec["rank"], rec["step"])] = rec["keys"]
    return out


@pytest.mark.slow
@pytest.mark.parametrize("extra", [
    # epochs of 5 steps: killed after step 5, the last batch of epoch 0, where Lightning resumes into an epoch
    # numbered one higher (the data must still go on with epoch 1); steps 6-14 cross another epoch end
    pytest.param(["--data.init_args.num_workers=0", "--data.init_args.samples_per_epoch=20"], id="workers0-epoch-end"),
    pytest.param(["--data.init_args.num_workers=2"], id="workers2"),
    pytest.param(["--data.init_args.num_workers=1", "--trainer.strategy=ddp", "--trainer.devices=2"], id="ddp2"),
    pytest.param(["--data.init_args.num_workers=1", "--config", str(REPO / "configs" / "strategy" / "fsdp.yaml"),
                  "--trainer.devices=2", "--trainer.accelerator=cpu"], id="fsdp2"),
])
def test_kill_9_and_the_same_command_resume_bitwise(demo_data, tmp_path, extra):
    ref_dir, run_dir = tmp_path / "uninterrupted", tmp_path / "killed"
    run(fit_command(demo_data, ref_dir, *extra), tmp_path)
    cmd = fit_command(demo_data, run_dir, *extra)
    run_and_kill(cmd, tmp_path, run_dir, after_step=5)
    run(cmd, tmp_path)  # the same command again: resumes from the newest checkpoint of the run directory

    assert sorted(p.name for p in run_dir.iterdir() if p.name.startswith("version_")) == []
    for tag in ("train/loss", "train/lr", "train/grad_norm", "train/pos_sim"):
        ref, got = per_step(ref_dir, tag), per_step(run_dir, tag)
        assert len(ref) == STEPS and got == ref, f"{tag}: {got} != {ref}"
    ref_keys, got_keys = keys_per_step(ref_dir), keys_per_step(run_dir)
    assert len(ref_keys) == STEPS * (2 if "--trainer.devices=2" in extra else 1)
    assert got_keys == ref_keys
    ref_last, got_last = (load_meta(d / "checkpoints" / "last.ckpt") for d in (ref_dir, run_dir))
    assert got_last["global_step"] == ref_last["global_step"] >= 10
    for name, value in ref_last.get("state_dict", {}).items():
        assert torch.equal(got_last["state_dict"][name], value), name
    assert not [p for p in (run_dir / "checkpoints").iterdir() if p.name.startswith(".")], "a temporary was left"


def test_resume_with_another_backbone_refuses_naming_the_key(demo_data, tmp_path):
    run_dir = tmp_path / "run"
    cmd = fit_command(demo_data, run_dir, "--data.init_args.num_workers=0")
    cmd[cmd.index(f"--trainer.max_steps={STEPS}")] = "--trainer.max_steps=5"
    run(cmd, tmp_path)
    res = subprocess.run([*cmd, "--model.init_args.backbone.seed=1"], cwd=tmp_path, env=env(),
                         capture_output=True, text=True, timeout=300)
    assert res.returncode != 0
    assert "backbone.seed" in res.stderr and "0 -> 1" in res.stderr, res.stderr[-3000:]


def test_weight_settings_that_refuse_a_resume():
    from muco.train.init_from import resume_mismatches

    saved = {"tokenizer": "tiny", "backbone": {"preset": "tiny", "seed": 0,
                                               "adapter": {"kind": "lora", "r": 4, "alpha": 8}}}
    same = {**saved, "backbone": {**saved["backbone"], "gradient_checkpointing": True, "dtype": "bfloat16"}}
    assert resume_mismatches(saved, same) == []  # runtime choices may change between restarts
    other = {"tokenizer": "qwen-offline", "backbone": {"preset": "tiny", "seed": 0,
                                                      "adapter": {"kind": "dora", "r": 4, "alpha": 8}}}
    assert resume_mismatches(saved, other) == ["backbone.adapter.kind: 'lora' -> 'dora'",
                                               "tokenizer: 'tiny' -> 'qwen-offline'"]
    assert resume_mismatches({**saved, "tokenizer": None}, saved) == []  # not recorded by older checkpoints
