"""`muco mine` end to end on tiny shards and a tiny checkpoint: 1 process, 2 processes (DDP, gloo), rerun; the
command writes what the pipeline (tests/mine/test_pipeline.py) writes when called directly."""

from __future__ import annotations

import json
import os

import pytest

from muco.cli.mine import main, parse_args
from muco.data.m3t.sidecar import iter_sidecar_rows, read_sidecar_manifest
from muco.mine.pipeline import settings
from tests.mine.conftest import BATCH, CORPUS_CHUNK, EXTRA, MARGIN, QUERY_CHUNK, TOP_K, mine_config
from tests.train.conftest import REPO, run_muco


def _args(ckpt, manifest, out, *extra: str) -> list[str]:
    return ["mine", "--model", str(ckpt), "--shards", str(manifest), "--output", str(out), "--top-k", str(TOP_K),
            "--margin", str(MARGIN), "--extra", str(EXTRA), "--batch-size", str(BATCH), "--num-workers", "0",
            "--query-chunk", str(QUERY_CHUNK), "--corpus-chunk", str(CORPUS_CHUNK), "--no-progress", *extra]


@pytest.fixture(scope="module")
def mined(tiny_ckpt, mine_shards, tmp_path_factory):
    manifest, records = mine_shards
    root = tmp_path_factory.mktemp("mined")
    procs = {}
    for name, extra in (("one", ()), ("two", ("--devices", "2"))):
        procs[name] = run_muco(*_args(tiny_ckpt, manifest, root / name, *extra), cwd=REPO)
        assert procs[name].returncode == 0, procs[name].stderr[-3000:]
    return root, procs, records


def test_the_command_writes_what_the_pipeline_writes(mined, pipeline_mined):
    root, procs, records = mined
    cfg, summary = pipeline_mined
    man = read_sidecar_manifest(root / "one")
    assert man["settings"] == settings(cfg) and man["summary"] == summary
    assert list(iter_sidecar_rows(root / "one")) == list(iter_sidecar_rows(cfg.output))
    # what the command adds: the named skip warning on stderr, the summary on stdout
    assert "bad0001" in procs["one"].stderr and "train-000001.tar" in procs["one"].stderr  # named skip warning
    assert json.loads(procs["one"].stdout[procs["one"].stdout.index("{"):]) == man["summary"]


@pytest.mark.slow
def test_two_processes_equal_one(mined):
    """Each process keeps half the corpus and the query blocks travel a ring; batches are shared out whole, so
    the sidecar is the single process's, line for line (similarities and ties included)."""
    root, _, _ = mined
    one, two = list(iter_sidecar_rows(root / "one")), list(iter_sidecar_rows(root / "two"))
    assert len(one) == 36 and one == two
    assert sum(len(r["negatives"]) for r in one) > 0
    m1, m2 = read_sidecar_manifest(root / "one"), read_sidecar_manifest(root / "two")
    assert m1 == m2


def test_rerun_is_skipped_unless_overwrite(mined, tiny_ckpt, mine_shards, capsys):
    root, _, _ = mined
    manifest, _ = mine_shards
    stamp = os.stat(root / "one" / "manifest.json").st_mtime_ns
    assert main(_args(tiny_ckpt, manifest, root / "one")[1:]) == 0  # same settings: nothing to do
    assert "already holds" in capsys.readouterr().out
    assert os.stat(root / "one" / "manifest.json").st_mtime_ns == stamp
    # other settings are not "complete": the decision reads the stored settings (more in test_pipeline.py)
    args = parse_args(_args(tiny_ckpt, manifest, root / "one", "--margin", "0.1")[1:])
    wanted = settings(mine_config(tiny_ckpt, manifest, root / "one", margin=args.margin))
    assert wanted["image_policy"] == "tiny"  # the training data's policy, read from the checkpoint
    assert wanted != read_sidecar_manifest(root / "one")["settings"]


def test_turns_per_sequence_must_be_a_choice_or_a_positive_number(tiny_ckpt, mine_shards, tmp_path):
    manifest, _ = mine_shards
    for bad in ("0", "some"):
        with pytest.raises(SystemExit) as e:
            main(_args(tiny_ckpt, manifest, tmp_path / "out", "--turns-per-sequence", bad)[1:])
        assert str(e.value) == ("muco mine: --turns-per-sequence must be train, all or a positive number, got "
                                f"{bad!r}")
    assert not (tmp_path / "out").exists()
