"""The sidecar directory: round trip, parts, atomic rewrite, and the reader's errors."""

from __future__ import annotations

import gzip
import json

import pytest

from muco.data.m3t.sidecar import (
    FORMAT,
    MinedNegative,
    SidecarError,
    load_sidecar,
    read_sidecar_manifest,
    write_sidecar,
)


def _rows(n: int, turns: int = 2) -> list[dict]:
    return [{"key": f"k{i}", "turn": t, "pos_sim": 0.9,
             "negatives": [{"text": f"neg {i}.{t}.{r} é", "rank": r, "sim": 0.8 - r / 100} for r in (1, 2, 3)]}
            for i in range(n) for t in range(turns)]


def test_round_trip_in_parts(tmp_path):
    out = tmp_path / "mined"
    m = write_sidecar(out, iter(_rows(5)), {"model": "m.ckpt", "shards": ["a.tar"], "top_k": 3, "margin": 0.05,
                                            "summary": {"query_turns": 10}}, rows_per_part=4)
    man = json.loads(m.read_text())
    assert man["format"] == FORMAT and man["parts"] == ["part-00000.jsonl.gz", "part-00001.jsonl.gz",
                                                         "part-00002.jsonl.gz"]
    assert man["num_query_turns"] == 10 and man["top_k"] == 3 and man["margin"] == 0.05 and man["model"] == "m.ckpt"
    assert not list(out.glob("*.tmp"))
    side = load_sidecar(out)
    assert len(side) == 10 and side[("k3", 1)][0] == MinedNegative("neg 3.1.1 é", 1, 0.79)
    assert [n.rank for n in side[("k0", 0)]] == [1, 2, 3]
    assert side.get(("k9", 0), []) == []  # absent (key, turn): no negatives
    assert load_sidecar(out / "manifest.json") == side
    assert set(load_sidecar(out, keys={"k1"})) == {("k1", 0), ("k1", 1)}
    with gzip.open(out / man["parts"][0], "rt", encoding="utf-8") as f:
        assert json.loads(f.readline()) == _rows(5)[0]


def test_rewrite_drops_stale_parts_and_an_interrupted_run_leaves_no_manifest(tmp_path):
    out = tmp_path / "mined"
    write_sidecar(out, _rows(5), {}, rows_per_part=2)
    assert len(list(out.glob("part-*"))) == 5
    first = (out / "part-00000.jsonl.gz").read_bytes()
    write_sidecar(out, _rows(1), {}, rows_per_part=2)
    assert sorted(p.name for p in out.iterdir()) == ["manifest.json", "part-00000.jsonl.gz"]
    assert (out / "part-00000.jsonl.gz").read_bytes() == first  # reproducible bytes (gzip mtime 0)

    def dying():
        yield from _rows(3)
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        write_sidecar(out, dying(), {}, rows_per_part=2)
    assert not (out / "manifest.json").exists() and not list(out.glob("*.tmp"))
    with pytest.raises(SidecarError, match="no manifest.json"):
        load_sidecar(out)


def test_empty_sidecar(tmp_path):
    write_sidecar(tmp_path, [], {})
    assert load_sidecar(tmp_path) == {} and read_sidecar_manifest(tmp_path)["num_query_turns"] == 0


def test_reader_errors(tmp_path):
    with pytest.raises(SidecarError, match="does not exist"):
        load_sidecar(tmp_path / "nowhere")
    write_sidecar(tmp_path, _rows(1), {})
    man = json.loads((tmp_path / "manifest.json").read_text())
    (tmp_path / "manifest.json").write_text(json.dumps({**man, "format": "muco-negatives/0"}))
    with pytest.raises(SidecarError, match="format 'muco-negatives/0'"):
        load_sidecar(tmp_path)
    (tmp_path / "manifest.json").write_text("{oops")
    with pytest.raises(SidecarError, match="not valid JSON"):
        load_sidecar(tmp_path)
    (tmp_path / "manifest.json").write_text(json.dumps({**man, "parts": ["part-00009.jsonl.gz"]}))
    with pytest.raises(SidecarError, match="do not exist"):
        load_sidecar(tmp_path)
    (tmp_path / "manifest.json").write_text(json.dumps(man))
    with gzip.open(tmp_path / man["parts"][0], "wt") as f:
        f.write(json.dumps({"key": "k", "turn": 0}) + "\n")
    with pytest.raises(SidecarError, match="malformed line"):
        load_sidecar(tmp_path)
