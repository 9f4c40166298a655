"""Fixtures for the mining tests: tiny shards with shared and near-duplicate targets, a tiny checkpoint, and one
mining run of the pipeline in this process."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from muco.data.shards import ShardWriter, write_manifest
from tests.records import jpeg, record_json

TURNS = 3
SHARED = "A shared answer."
NEAR_DUP = "a  SHARED answer"
# the mining settings of the tests: an untrained model puts every text near every query, a zero margin keeps some
TOP_K, MARGIN, EXTRA, BATCH, QUERY_CHUNK, CORPUS_CHUNK = 4, 0.0, 8, 3, 7, 5


def mining_records(n: int = 12) -> list[tuple[str, dict]]:
    """``n`` 3-turn records; s0001 and s0004 share a target text, s0002's is a near-duplicate of it."""
    out = []
    for i in range(n):
        key = f"s{i:04d}"
        rec = record_json(key, turns=TURNS, cands=2)
        if i == 1:
            rec["turns"][0]["target"] = SHARED
        if i == 4:
            rec["turns"][2]["target"] = SHARED
        if i == 2:
            rec["turns"][1]["target"] = NEAR_DUP
        out.append((key, rec))
    return out


@pytest.fixture(scope="package")
def jpegs_of_records(photos) -> list[bytes]:
    """The image bytes of each of :func:`mining_records`'s samples."""
    return [jpeg(photos[i % len(photos)]) for i in range(len(mining_records()))]


@pytest.fixture(scope="package")
def mine_shards(tmp_path_factory, photos, jpegs_of_records) -> tuple[Path, list[tuple[str, dict]]]:
    """3 shards of up to 5 samples: 12 good ones and one corrupt (skipped); returns (manifest, records)."""
    out = tmp_path_factory.mktemp("mine_shards")
    records = mining_records()
    with ShardWriter(str(out / "train-%06d.tar"), max_samples=5) as w:
        for i, (key, rec) in enumerate(records):
            w.write(key, [("jpg", jpegs_of_records[i]), ("json", json.dumps(rec).encode())])
            if i == 5:  # a bad sample: invalid JSON
                w.write("bad0001", [("jpg", jpeg(photos[0])), ("json", b"{not json")])
    return write_manifest(out / "manifest.json", w.shards), records


@pytest.fixture(scope="package")
def tiny_ckpt(tmp_path_factory) -> Path:
    """A tiny MuCoModule saved as a Lightning checkpoint whose data config names the `tiny` image policy."""
    from muco.model.backbone import AdapterConfig, BackboneConfig
    from muco.train.module import MuCoModule

    torch.manual_seed(0)
    module = MuCoModule(tokenizer="tiny", backbone=BackboneConfig(preset="tiny", adapter=AdapterConfig(r=4, alpha=8)),
                        eval_image_policy="tiny")
    with torch.no_grad():
        for _, p in module.named_parameters():
            if p.requires_grad:
                p.add_(0.05 * torch.randn_like(p))  # a "trained" adapter
    ckpt = {"state_dict": module.state_dict(), "hyper_parameters": dict(module.hparams),
            "datamodule_hyper_parameters": {"image_policy": "tiny"}}
    module.on_save_checkpoint(ckpt)
    path = tmp_path_factory.mktemp("ckpt") / "last.ckpt"
    torch.save(ckpt, path)
    return path


def mine_config(ckpt: Path, manifest: Path, out: Path, **changes):
    """The tests' mining settings (the same as test_mine_cli's command line) as the pipeline's config."""
    from muco.data.shards import resolve_shards
    from muco.mine.pipeline import MineConfig, resolve_image_policy

    kw = dict(model=str(ckpt), shards=tuple(resolve_shards([str(manifest)]).urls), output=str(out), top_k=TOP_K,
              margin=MARGIN, extra=EXTRA, image_policy=resolve_image_policy(ckpt, "train"), batch_size=BATCH,
              query_chunk=QUERY_CHUNK, corpus_chunk=CORPUS_CHUNK, num_workers=0, progress=False)
    return MineConfig(**{**kw, **changes})


@pytest.fixture(scope="package")
def pipeline_mined(tiny_ckpt, mine_shards, tmp_path_factory):
    """``muco.mine.pipeline.mine`` run in this process (one process, CPU): (config, returned summary)."""
    from muco.mine.pipeline import mine

    cfg = mine_config(tiny_ckpt, mine_shards[0], tmp_path_factory.mktemp("pipeline") / "out")
    return cfg, mine(cfg, "cpu")
