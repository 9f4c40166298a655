"""Shards read over the network: a manifest or brace pattern of http:// URLs (a real server on the loopback
address) and pipe: commands stream the same samples as local files, with the same bad-data accounting."""

from __future__ import annotations

import io
import json
import logging
import tarfile

import pytest
from torch.utils.data import DataLoader

from muco.data.shards import read_manifest, resolve_shards
from tests.data.builders import m3t_data
from tests.http_server import http_server

TINY = {"tokenizer": "tiny", "image_policy": "tiny"}


def keys_of(dm, split: str = "train") -> list[str]:
    return [k for b in DataLoader(dm.make_dataset(split), batch_size=None) for k in b["keys"]]


def test_a_remote_manifest_streams_what_the_local_one_does(make_shards, tmp_path):
    _, keys, manifest = make_shards(n_shards=4, per_shard=3)
    local = m3t_data(str(manifest), val_shards=str(manifest), batch_size=2, num_workers=0, resampled=False, **TINY)
    local.setup("fit")
    with http_server(tmp_path) as served:
        url = served.url(manifest.relative_to(tmp_path))
        shard_set = read_manifest(url)
        assert shard_set.urls == [served.url(f"train/train-{i:06d}.tar") for i in range(4)]
        assert (shard_set.num_samples, shard_set.turns) == (12, 7)
        remote = m3t_data(url, val_shards=url, batch_size=2, num_workers=0, resampled=False, **TINY)
        remote.setup("fit")
        assert remote.train_config.samples_per_epoch == 12  # the epoch length comes from the remote manifest
        assert keys_of(remote) == keys_of(local) and sorted(keys_of(remote)) == keys
        assert keys_of(remote, "val") == keys_of(local, "val") == keys
        # this test's read, then one per source at setup: reading batches never fetches it again
        assert served.requests["train/manifest.json"] == 3


def test_pipe_commands_are_shards_too(make_shards):
    pattern, keys, _ = make_shards(n_shards=2, per_shard=3)
    local = resolve_shards(pattern).urls
    orders = []
    for urls in (local, [f"pipe:cat {u}" for u in local]):
        dm = m3t_data(urls, batch_size=3, num_workers=0, resampled=False, **TINY)
        dm.setup("fit")
        orders.append(keys_of(dm))
    assert orders[1] == orders[0] and sorted(orders[1]) == keys


def test_remote_failures_cost_only_what_they_must(make_shards, tmp_path, caplog):
    _, keys, _ = make_shards(n_shards=3, per_shard=4)
    with http_server(tmp_path, truncate=("train/train-000002.tar",)) as served:
        urls = [served.url(f"train/train-{i:06d}.tar") for i in (0, 3, 2)]  # 000003 does not exist: 404
        dm = m3t_data(urls, batch_size=1, num_workers=0, resampled=False, **TINY)
        dm.setup("fit")
        ds = dm.make_dataset("train")
        with caplog.at_level(logging.WARNING, logger="muco.data"):
            got = [k for b in DataLoader(ds, batch_size=None) for k in b["keys"]]
    # shard 0 whole; of the shard cut in half, what arrived before curl reported the cut (how much of the
    # buffered rest arrives first is up to the pipe's timing), and nothing twice
    assert set(keys[:4]) <= set(got) <= set(keys[:4] + keys[8:]) and len(set(got)) == len(got) < 8
    assert ds.position.skipped == 2  # the missing shard and the cut one, each counted once
    warned = [r.getMessage() for r in caplog.records]
    assert any(m.endswith(f"shard {urls[1]}: unreadable tar, rest of shard skipped (reader exited with status 22: "
                          "HTTP error (e.g. 404)) [worker r0w0, 1 skipped so far]") for m in warned)
    assert any(urls[2] in m and "status 18: transfer cut short" in m for m in warned)


def test_a_remote_manifest_that_cannot_be_read_fails_in_setup(tmp_path):
    (tmp_path / "bad.json").write_text("{not json")
    with http_server(tmp_path) as served:
        with pytest.raises(FileNotFoundError, match=r"missing/manifest.json could not be read .*check the URL"):
            m3t_data(served.url("missing/manifest.json"), batch_size=2, **TINY).setup("fit")
        with pytest.raises(ValueError, match="bad.json is invalid"):
            read_manifest(served.url("bad.json"))
    with pytest.raises(ValueError, match="relative shard name 'a.tar'.* pipe: has no base"):
        read_manifest("pipe:echo '" + json.dumps({"shards": [{"name": "a.tar", "num_samples": 1}]}) + "'")


def test_the_record_kind_of_a_remote_source_is_checked_in_setup(tmp_path):
    rec = {"query": {"text": "a cat?", "image": None, "caption": None},
           "positive": {"text": "a cat.", "image": None, "caption": None}, "negatives": []}
    data = json.dumps(rec).encode()
    with tarfile.open(tmp_path / "pairs-000000.tar", "w") as tar:
        info = tarfile.TarInfo("p0000.json")
        info.size = len(data)
        tar.addfile(info, io.BytesIO(data))
    with http_server(tmp_path) as served:
        dm = m3t_data(served.url("pairs-000000.tar"), batch_size=2, num_workers=0, samples_per_epoch=8, **TINY)
        with pytest.raises(ValueError, match="holds fine-tuning pairs .*PairRecords"):
            dm.setup("fit")


def test_muco_fit_trains_on_shards_served_over_http(demo_data, tmp_path):
    """The real command, its training and validation shards behind a loopback HTTP server."""
    from tests.train.conftest import REPO, read_scalars, run_muco

    with http_server(demo_data) as served:
        res = run_muco("fit", "--config", str(REPO / "configs" / "tiny.yaml"),
                       f"--data.init_args.train_shards={served.url('train/manifest.json')}",
                       f"--data.init_args.val_shards={served.url('val/manifest.json')}",
                       "--trainer.max_steps=3", "--trainer.val_check_interval=3", "--trainer.log_every_n_steps=1",
                       "--trainer.enable_progress_bar=false", f"--trainer.default_root_dir={tmp_path / 'run'}",
                       cwd=tmp_path)
        fetched = dict(served.requests)
    assert res.returncode == 0, res.stderr[-3000:]
    scalars = read_scalars(tmp_path / "run")
    assert len(scalars["train/loss"]) == 3 and "val/loss" in scalars
    assert fetched["train/manifest.json"] >= 1 and any(p.startswith("train/train-") for p in fetched)
    assert any(p.startswith("val/val-") for p in fetched)
