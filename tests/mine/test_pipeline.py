"""The mining pipeline called directly (no command line): what it keeps and filters, the settings that make a
finished sidecar reusable, and the checkpoint's data settings it follows."""

from __future__ import annotations

import dataclasses
import os

import pytest
import torch

from muco.data.m3t.sidecar import iter_sidecar_rows, load_sidecar, read_sidecar_manifest
from muco.mine.pipeline import (
    MineConfig,
    is_complete,
    model_fingerprint,
    resolve_image_policy,
    resolve_turns_per_sequence,
    settings,
)
from muco.mine.select import normalize_text
from tests.mine.conftest import MARGIN, NEAR_DUP, SHARED, TOP_K, TURNS, mine_config


def test_sidecar_content_follows_the_filters(pipeline_mined, mine_shards):
    cfg, summary = pipeline_mined
    _, records = mine_shards
    side = load_sidecar(cfg.output)
    man = read_sidecar_manifest(cfg.output)
    assert man["format"] == "muco-negatives/1" and man["top_k"] == TOP_K and man["margin"] == MARGIN
    assert man["num_query_turns"] == len(records) * TURNS == len(side)
    assert man["summary"] == summary and man["settings"] == settings(cfg)
    assert summary["skipped_samples"] == 1 and summary["samples"] == len(records)
    assert summary["query_turns"] == len(records) * TURNS
    assert set(summary["filtered"]) == {"positive", "same_sample", "near_duplicate", "false_negative"}
    assert summary["filtered"]["positive"] > 0 and summary["filtered"]["same_sample"] > 0

    rows = {(r["key"], r["turn"]): r for r in iter_sidecar_rows(cfg.output)}
    short = 0
    for key, rec in records:
        targets = [t["target"] for t in rec["turns"]]
        for turn, pos in enumerate(targets):
            negs = side[(key, turn)]
            short += len(negs) < TOP_K
            assert [n.rank for n in negs] == list(range(1, len(negs) + 1)) and len(negs) <= TOP_K
            sims = [n.sim for n in negs]
            assert sims == sorted(sims, reverse=True)
            pos_sim = rows[(key, turn)]["pos_sim"]
            assert all(s <= pos_sim - MARGIN + 1e-6 for s in sims)
            texts = [n.text for n in negs]
            assert not set(texts) & set(targets), "positive or a same-image target kept"
            assert all(normalize_text(t) != normalize_text(pos) for t in texts), "near-duplicate kept"
    assert short == summary["turns_short"] < len(side) and summary["negatives_kept"] > 0
    assert summary["filtered"]["false_negative"] > 0
    # the shared text is the positive of s0001 turn 0 and of s0004 turn 2; its near-duplicate is excluded for both
    assert NEAR_DUP not in {n.text for n in side[("s0001", 0)]} | {n.text for n in side[("s0004", 2)]}
    assert SHARED not in {n.text for n in side[("s0002", 1)]}


def test_is_complete_reads_the_stored_settings(pipeline_mined, tiny_ckpt, mine_shards, tmp_path):
    cfg, _ = pipeline_mined
    assert cfg.image_policy == "tiny"  # the training data's policy, read from the checkpoint
    assert is_complete(cfg.output, settings(cfg))
    # batch sizes, chunks, workers and the sample count do not change the result
    assert is_complete(cfg.output, settings(dataclasses.replace(cfg, batch_size=7, query_chunk=1, corpus_chunk=2,
                                                                num_workers=1, num_samples=12, progress=True)))
    # other settings are not "complete": the decision reads the stored settings
    assert not is_complete(cfg.output, settings(dataclasses.replace(cfg, margin=0.1)))
    assert not is_complete(cfg.output, settings(dataclasses.replace(cfg, turns_per_sequence=2)))
    assert not is_complete(cfg.output, settings(dataclasses.replace(cfg, image_policy=None)))
    assert not is_complete(tmp_path / "nothing", settings(cfg))
    (tmp_path / "manifest.json").write_text("{not json")
    assert not is_complete(tmp_path, settings(cfg))


def test_settings_follow_the_model_file(tiny_ckpt, mine_shards, tmp_path):
    model = tmp_path / "last.ckpt"
    model.write_bytes(tiny_ckpt.read_bytes())
    cfg = mine_config(model, mine_shards[0], tmp_path / "out")
    before = settings(cfg)
    assert before["model"] == str(model.resolve()) and before["model_fingerprint"] == model_fingerprint(model)
    assert before["margin"] == MARGIN and before["turns_per_sequence"] == "all"
    assert before["shards"] == [os.path.abspath(u) for u in cfg.shards]
    os.utime(model, ns=(1, 1))  # the model was written again
    assert settings(cfg)["model_fingerprint"] != before["model_fingerprint"]


def _ckpt_with_data_settings(path, **data) -> str:
    torch.save({"state_dict": {}, "hyper_parameters": {}, "datamodule_hyper_parameters": data}, path)
    return str(path)


def test_image_policy_and_turns_follow_the_training_data(tiny_ckpt, tmp_path):
    assert resolve_image_policy(tiny_ckpt, "train") == "tiny"
    assert resolve_image_policy(tiny_ckpt, "model") is None
    assert resolve_image_policy(tiny_ckpt, "eval") == "eval"
    assert resolve_image_policy(tmp_path, "train") == "pretrain"  # an exported directory records no data settings
    odd = _ckpt_with_data_settings(tmp_path / "odd.ckpt", image_policy="no such preset", turns_per_sample=0)
    assert resolve_image_policy(odd, "train") == "pretrain"

    assert resolve_turns_per_sequence(tiny_ckpt, "train") is None  # not recorded: all turns in one sequence
    assert resolve_turns_per_sequence(odd, "train") is None
    k2 = _ckpt_with_data_settings(tmp_path / "k2.ckpt", turns_per_sample=2)
    assert resolve_turns_per_sequence(k2, "train") == 2
    assert resolve_turns_per_sequence(k2, "all") is None
    assert resolve_turns_per_sequence(k2, 5) == 5
    # as `muco fit` records it: in the record kind's settings
    k3 = _ckpt_with_data_settings(tmp_path / "k3.ckpt", records={"class_path": "muco.data.m3t.kind.M3TRecords",
                                                                  "init_args": {"turns_per_sample": 3}})
    assert resolve_turns_per_sequence(k3, "train") == 3
    for bad in (0, -1, "3", "some", True):
        with pytest.raises(ValueError, match="train, all or a positive number"):
            resolve_turns_per_sequence(k2, bad)


def test_config_checks(tmp_path):
    MineConfig("m.ckpt", ["a.tar"], tmp_path, margin=None, extra=0, turns_per_sequence=1, image_policy="tiny")
    for bad, match in [({"top_k": 0}, "top_k"), ({"corpus_chunk": 0}, "corpus_chunk"), ({"extra": -1}, "extra"),
                       ({"num_workers": -1}, "num_workers"), ({"margin": -0.1}, "margin"),
                       ({"turns_per_sequence": 0}, "turns_per_sequence"), ({"autocast": "fp8"}, "autocast"),
                       ({"image_policy": "huge"}, "image_policy")]:
        with pytest.raises(ValueError, match=match):
            MineConfig("m.ckpt", ["a.tar"], tmp_path, **bad)
