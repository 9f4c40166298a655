"""`muco mine` end to end on tiny shards and a tiny checkpoint: 1 process, 2 processes (DDP, gloo), rerun."""

from __future__ import annotations

import json
import os

import pytest

from muco.cli.mine import is_complete, main, parse_args, resolve_image_policy, settings
from muco.data.shards import resolve_shards
from muco.mine.select import normalize_text
from muco.mine.sidecar import iter_sidecar_rows, load_sidecar, read_sidecar_manifest
from tests.mine.conftest import NEAR_DUP, SHARED, TURNS
from tests.train.conftest import REPO, run_muco

TOP_K, MARGIN = 4, 0.0  # an untrained model puts every text near every query: a zero margin keeps some


def _args(ckpt, manifest, out, *extra: str) -> list[str]:
    return ["mine", "--model", str(ckpt), "--shards", str(manifest), "--output", str(out), "--top-k", str(TOP_K),
            "--margin", str(MARGIN), "--extra", "8", "--batch-size", "3", "--num-workers", "0", "--query-chunk", "7",
            "--corpus-chunk", "5", "--no-progress", *extra]


@pytest.fixture(scope="module")
def mined(tiny_ckpt, mine_shards, tmp_path_factory):
    manifest, records = mine_shards
    root = tmp_path_factory.mktemp("mined")
    procs = {}
    for name, extra in (("one", ()), ("two", ("--devices", "2"))):
        procs[name] = run_muco(*_args(tiny_ckpt, manifest, root / name, *extra), cwd=REPO)
        assert procs[name].returncode == 0, procs[name].stderr[-3000:]
    return root, procs, records


def test_sidecar_content_follows_the_filters(mined):
    root, procs, records = mined
    side = load_sidecar(root / "one")
    man = read_sidecar_manifest(root / "one")
    assert man["format"] == "muco-negatives/1" and man["top_k"] == TOP_K and man["margin"] == MARGIN
    assert man["num_query_turns"] == len(records) * TURNS == len(side)
    summary = man["summary"]
    assert summary["skipped_samples"] == 1 and summary["samples"] == len(records)
    assert summary["query_turns"] == len(records) * TURNS
    assert set(summary["filtered"]) == {"positive", "same_sample", "near_duplicate", "false_negative"}
    assert summary["filtered"]["positive"] > 0 and summary["filtered"]["same_sample"] > 0
    assert "bad0001" in procs["one"].stderr and "train-000001.tar" in procs["one"].stderr  # named skip warning
    assert json.loads(procs["one"].stdout[procs["one"].stdout.index("{"):]) == summary

    rows = {(r["key"], r["turn"]): r for r in iter_sidecar_rows(root / "one")}
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


def test_two_processes_equal_one(mined):
    root, _, _ = mined
    one, two = load_sidecar(root / "one"), load_sidecar(root / "two")
    assert one.keys() == two.keys()
    for k in one:
        assert [(n.text, n.rank) for n in one[k]] == [(n.text, n.rank) for n in two[k]], k
        assert all(abs(a.sim - b.sim) <= 1e-5 for a, b in zip(one[k], two[k]))
    m1, m2 = read_sidecar_manifest(root / "one"), read_sidecar_manifest(root / "two")
    assert m1["settings"] == m2["settings"] and m1["summary"]["filtered"] == m2["summary"]["filtered"]


def test_rerun_is_skipped_unless_overwrite(mined, tiny_ckpt, mine_shards, capsys):
    root, _, _ = mined
    manifest, _ = mine_shards
    stamp = os.stat(root / "one" / "manifest.json").st_mtime_ns
    assert main(_args(tiny_ckpt, manifest, root / "one")[1:]) == 0  # same settings: nothing to do
    assert "already holds" in capsys.readouterr().out
    assert os.stat(root / "one" / "manifest.json").st_mtime_ns == stamp
    # other settings are not "complete": the decision reads the stored settings
    args = parse_args(_args(tiny_ckpt, manifest, root / "one", "--margin", "0.1")[1:])
    wanted = settings(args, resolve_shards(args.shards).urls, resolve_image_policy(args.model, "train"), "none")
    assert wanted["image_policy"] == "tiny"  # the training data's policy, read from the checkpoint
    assert not is_complete(root / "one", wanted)
