"""2-process DDP and FSDP2 runs (real CLI, gloo on CPU) compute the gradients of one process on the union
batch: the gradient-carrying gather and DDP averaging together give the full-batch gradient (docs/method.md §7)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from tests.train.conftest import REPO

pytestmark = pytest.mark.slow

CONFIG = str(REPO / "configs" / "tiny.yaml")


@pytest.fixture(scope="module")
def two_shards(tmp_path_factory, demo_data):
    """2 shards of 4 images each: one per rank, or one batch of 8 for a single process."""
    import json

    from muco.convert.m3t import convert_jsonl

    root = tmp_path_factory.mktemp("two")
    lines = (demo_data / "train.jsonl").read_text().splitlines()[:8]
    (root / "r.jsonl").write_text("\n".join(lines) + "\n")
    assert all(json.loads(x)["image"] for x in lines)
    convert_jsonl(root / "r.jsonl", demo_data / "images", str(root / "s-%06d.tar"), max_samples_per_shard=4)
    return root / "manifest.json"


def snapshot_config(tmp_path: Path, name: str) -> str:
    cfg = tmp_path / f"{name}.yaml"
    cfg.write_text(
        "trainer:\n  logger: false\n  enable_checkpointing: false\n  enable_progress_bar: false\n"
        "  callbacks:\n    - class_path: muco.train.callbacks.GradientSnapshot\n"
        f"      init_args:\n        path: {tmp_path / name}.pt\n"
    )
    return str(cfg)


def run_step(muco_cli, tmp_path, manifest, name, batch_size, *extra):
    res = muco_cli(
        "fit", "--config", CONFIG, "--config", snapshot_config(tmp_path, name),
        f"--data.init_args.train_shards={manifest}", "--data.init_args.val_shards=null",
        "--data.init_args.resampled=false", "--data.init_args.shuffle_buffer=0",
        "--data.init_args.num_workers=0", "--data.init_args.samples_per_epoch=8",
        f"--data.init_args.batch_size={batch_size}", "--trainer.max_steps=1", "--trainer.limit_val_batches=0",
        "--model.init_args.backbone.adapter.r=4", "--model.init_args.backbone.adapter.alpha=8",
        *extra, cwd=tmp_path,
    )
    assert res.returncode == 0, res.stderr[-4000:]
    return torch.load(tmp_path / f"{name}.pt")


def assert_same_grads(a: dict, b: dict) -> None:
    assert a.keys() == b.keys() and len(a) > 10
    nonzero = 0
    for name in a:
        assert torch.allclose(a[name], b[name], atol=1e-5, rtol=1e-4), (name, (a[name] - b[name]).abs().max())
        nonzero += bool(a[name].abs().sum() > 0)
    assert nonzero > len(a) // 2, "most gradients are zero: the comparison would prove nothing"


@pytest.fixture(scope="module")
def single_grads(tmp_path_factory, two_shards):
    from tests.train.conftest import run_muco

    return run_step(run_muco, tmp_path_factory.mktemp("single"), two_shards, "single", 8)


def test_ddp_gradients_equal_single_process(muco_cli, tmp_path, two_shards, single_grads):
    ddp = run_step(muco_cli, tmp_path, two_shards, "ddp", 4, "--trainer.devices=2", "--trainer.strategy=ddp")
    assert_same_grads(single_grads, ddp)


def test_fsdp2_gradients_equal_single_process(muco_cli, tmp_path, two_shards, single_grads):
    fsdp = run_step(muco_cli, tmp_path, two_shards, "fsdp", 4, "--config", str(REPO / "configs/strategy/fsdp.yaml"),
                    "--trainer.devices=2")
    assert_same_grads(single_grads, fsdp)


@pytest.fixture(scope="module")
def sidecar_args(tmp_path_factory, demo_data) -> list[str]:
    """Mined negatives for the 8 samples of `two_shards` (turn 6 of every sample and all of one sample missing)."""
    import json

    from tests.mined import neg_text, write_sidecar

    keys = [json.loads(x)["key"] for x in (demo_data / "train.jsonl").read_text().splitlines()[:8]]
    rows = {(k, t): [neg_text(k, t, r) for r in range(1, 4)] for k in keys[1:] for t in range(6)}
    side = write_sidecar(tmp_path_factory.mktemp("sidecar") / "negatives", rows)
    return [f"--data.init_args.records.init_args.negatives={{sidecar: {side}, band: [1, 3], per_turn: 1}}"]


@pytest.fixture(scope="module")
def single_negs_grads(tmp_path_factory, two_shards, sidecar_args):
    from tests.train.conftest import run_muco

    return run_step(run_muco, tmp_path_factory.mktemp("single_negs"), two_shards, "single_negs", 8, *sidecar_args)


def test_ddp_with_mined_negatives_gradients_equal_single_process(muco_cli, tmp_path, two_shards, sidecar_args,
                                                                single_grads, single_negs_grads):
    """The packed negative sequences are gathered over ranks as extra columns of every query row."""
    single = single_negs_grads
    assert any(not torch.allclose(single[n], single_grads[n], atol=1e-6) for n in single)  # the negatives count
    ddp = run_step(muco_cli, tmp_path, two_shards, "ddp_negs", 4, "--trainer.devices=2", "--trainer.strategy=ddp",
                   *sidecar_args)
    assert_same_grads(single, ddp)


def test_grad_cache_under_ddp_with_negatives_equals_single_process(muco_cli, tmp_path, two_shards, sidecar_args,
                                                                   single_negs_grads):
    """GradCache chunks of 3 (not dividing the 4 samples of a rank): the gather, group masks and negatives see
    the whole batch, and DDP reduces the chunks' accumulated gradients once."""
    ddp = run_step(muco_cli, tmp_path, two_shards, "ddp_gc", 4, "--trainer.devices=2", "--trainer.strategy=ddp",
                   "--model.init_args.grad_cache_chunk=3", *sidecar_args)
    assert_same_grads(single_negs_grads, ddp)


def test_grad_cache_under_fsdp2_equals_single_process(muco_cli, tmp_path, two_shards, single_grads):
    fsdp = run_step(muco_cli, tmp_path, two_shards, "fsdp_gc", 4, "--config", str(REPO / "configs/strategy/fsdp.yaml"),
                    "--trainer.devices=2", "--model.init_args.grad_cache_chunk=3")
    assert_same_grads(single_grads, fsdp)


def test_padding_free_under_fsdp2_with_grad_cache_equals_padded_single_process(muco_cli, tmp_path, two_shards,
                                                                                single_grads):
    """Packed rows (backbone.padding_free) on sharded weights, in GradCache chunks: the padded single process's
    gradients."""
    fsdp = run_step(muco_cli, tmp_path, two_shards, "fsdp_packed", 4, "--config",
                    str(REPO / "configs/strategy/fsdp.yaml"), "--trainer.devices=2",
                    "--model.init_args.grad_cache_chunk=3", "--model.init_args.backbone.padding_free=true")
    assert_same_grads(single_grads, fsdp)
