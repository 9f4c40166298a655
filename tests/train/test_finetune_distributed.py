"""2-process DDP fine-tuning (real CLI, gloo on CPU) computes the gradients of one process on the union batch,
hard negatives gathered with gradient across ranks and missing negatives masked (docs/method.md §8.3, §8.4)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.train.conftest import REPO
from tests.train.test_distributed import assert_same_grads, snapshot_config

pytestmark = pytest.mark.slow

CONFIG = """\
seed_everything: 0
trainer:
  accelerator: cpu
  devices: 1
  max_steps: 1
  limit_val_batches: 0
  gradient_clip_val: 1.0
model:
  class_path: muco.train.module.MuCoModule
  init_args:
    tokenizer: tiny
    backbone:
      preset: tiny
      adapter: {r: 4, alpha: 8}
    objective:
      class_path: muco.objectives.FinetuneObjective
      init_args: {loss: LOSS}
    optim: {lr: 1.0e-3}
data:
  class_path: muco.data.datamodule.MuCoDataModule
  init_args:
    train_shards: MANIFEST
    records: {class_path: muco.data.pairs.kind.PairRecords}
    resampled: false
    shuffle_buffer: 0
    num_workers: 0
    samples_per_epoch: 8
    image_policy: tiny
"""


@pytest.fixture(scope="module")
def pair_shards(tmp_path_factory, demo_data):
    """2 shards of 4 demo pairs (image queries, an image positive, image and text negatives), 2 without negatives."""
    from muco.convert.pairs import convert_pairs
    from muco.demo.digits import load_digits_images
    from muco.demo.pairs import pair_rows

    root = tmp_path_factory.mktemp("pairs")
    rows = pair_rows(load_digits_images()[:40], seed=1, pairs_per_digit=1, no_negative_frac=0.0)[:8]
    for i in (2, 5):
        rows[i]["neg_text"], rows[i]["neg_image_path"] = "[]", ""
    (root / "p.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    summary = convert_pairs(root / "p.jsonl", demo_data / "images", str(root / "s-%06d.tar"), max_samples_per_shard=4)
    assert (summary.written, len(summary.shards)) == (8, 2)
    return root / "manifest.json"


def run_step(muco_cli, tmp_path: Path, manifest: Path, loss: str, name: str, batch_size: int, *extra: str):
    import torch

    cfg = tmp_path / "ft.yaml"
    cfg.write_text(CONFIG.replace("LOSS", loss).replace("MANIFEST", str(manifest)))
    res = muco_cli("fit", "--config", str(cfg), "--config", snapshot_config(tmp_path, name),
                   f"--data.init_args.batch_size={batch_size}", *extra, cwd=tmp_path)
    assert res.returncode == 0, res.stderr[-4000:]
    return torch.load(tmp_path / f"{name}.pt")


@pytest.mark.parametrize("loss", ["blockwise", "joint_masked"])
def test_ddp_finetune_gradients_equal_single_process(muco_cli, tmp_path_factory, pair_shards, loss):
    single = run_step(muco_cli, tmp_path_factory.mktemp("single"), pair_shards, loss, "single", 8)
    ddp = run_step(muco_cli, tmp_path_factory.mktemp("ddp"), pair_shards, loss, "ddp", 4,
                   "--trainer.devices=2", "--trainer.strategy=ddp")
    assert_same_grads(single, ddp)


@pytest.fixture(scope="module")
def image_split_shards(tmp_path_factory, demo_data):
    """Rank 0's shard: 4 pairs with image queries and text positives; rank 1's: 4 pairs with text queries and
    image positives. Each forward then has images on one rank only."""
    from muco.convert.pairs import convert_pairs
    from muco.demo.digits import load_digits_images
    from muco.demo.pairs import pair_rows

    root = tmp_path_factory.mktemp("image_split")
    rows = pair_rows(load_digits_images()[:80], seed=1, pairs_per_digit=2, no_negative_frac=0.0)
    image_queries = [r for r in rows if r["qry_image_path"] and not r.get("pos_image_path")][:4]
    text_queries = [r for r in rows if not r["qry_image_path"] and r.get("pos_image_path")][:4]
    assert len(image_queries) == len(text_queries) == 4
    (root / "p.jsonl").write_text("".join(json.dumps(r) + "\n" for r in image_queries + text_queries))
    summary = convert_pairs(root / "p.jsonl", demo_data / "images", str(root / "s-%06d.tar"), max_samples_per_shard=4)
    assert (summary.written, len(summary.shards)) == (8, 2)
    return root / "manifest.json"


def test_fsdp2_finetune_with_images_on_one_rank_per_forward_equals_single_process(muco_cli, tmp_path_factory,
                                                                                   image_split_shards):
    # FSDP2 gathers a block's weights from every rank when it runs: the query forward has images on rank 0 only
    # and the positives' on rank 1 only, so the other rank runs the vision tower on a blank image
    # (muco.model.sharding.vision_on_every_rank); without it the ranks' collectives would not match
    single = run_step(muco_cli, tmp_path_factory.mktemp("single"), image_split_shards, "blockwise", "single", 8)
    tmp = tmp_path_factory.mktemp("fsdp")
    fsdp = run_step(muco_cli, tmp, image_split_shards, "blockwise", "fsdp", 4,
                    "--config", str(REPO / "configs" / "strategy" / "fsdp.yaml"), "--trainer.devices=2",
                    f"--trainer.default_root_dir={tmp / 'run'}")
    assert_same_grads(single, fsdp)
