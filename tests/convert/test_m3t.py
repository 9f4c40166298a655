"""The M3T kind: the released parquet and project-schema JSONL -> pretraining shards."""

from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

import pytest
from PIL import Image

from muco.convert.m3t import convert_jsonl, convert_parquet
from muco.data.m3t.records import M3T_TASKS

pytest.importorskip("pyarrow")


def read_shard(path: Path) -> dict[str, dict[str, bytes]]:
    out: dict[str, dict[str, bytes]] = {}
    with tarfile.open(path) as tar:
        for m in tar.getmembers():
            key, ext = m.name.split(".", 1)
            out.setdefault(key, {})[ext] = tar.extractfile(m).read()
    return out


def test_convert_released_parquet(released, tmp_path, jpegs):
    path, root = released
    out = tmp_path / "out"
    s = convert_parquet(path, root, str(out / "train-%06d.tar"), max_samples_per_shard=4, batch_rows=3)
    assert (s.written, s.rejected) == (6, 6)
    assert s.reasons == {"missing_image": 1, "turn_count": 1, "empty": 1, "reserved": 1, "bad_image": 2}
    assert sorted(p.name for p in out.iterdir()) == [
        "manifest.json", "rejects.jsonl", "train-000000.tar", "train-000001.tar", "train-progress.jsonl"]
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["num_samples"] == 6 and manifest["turns"] == 7
    assert [(x["name"], x["num_samples"]) for x in manifest["shards"]] == [
        ("train-000000.tar", 4), ("train-000001.tar", 2)]

    samples = {**read_shard(out / "train-000000.tar"), **read_shard(out / "train-000001.tar")}
    assert sorted(samples) == [f"M3T_{r:09d}" for r in range(6)]
    rec = json.loads(samples["M3T_000000003"]["json"])
    assert rec["caption"] == "caption of r3"
    assert [t["task"] for t in rec["turns"]] == list(M3T_TASKS)
    # markers stripped, all candidates kept in order, targets aligned
    assert rec["turns"][4] == {"task": "vqa_local", "queries": ["r3 q4 a", "r3 q4 b", "r3 q4 c"],
                               "target": "r3 t4"}
    assert "negatives" not in rec  # neg_text is not a hard negative of M3T
    assert samples["M3T_000000003"]["jpg"] == jpegs[3]  # original bytes, no re-encode
    assert set(samples["M3T_000000005"]) == {"png", "json"}

    rejects = [json.loads(line) for line in (out / "rejects.jsonl").read_text().splitlines()]
    assert [(r["row"], r["reason"]) for r in rejects] == [
        (6, "missing_image"), (7, "turn_count"), (8, "empty"), (9, "reserved"), (10, "bad_image"),
        (11, "bad_image")]
    assert rejects[2]["key"] == "M3T_000000008" and "turns[3].queries[1]" in rejects[2]["message"]


def test_convert_jsonl_with_pool_and_max_side(tmp_path, m3t_jsonl):
    path, root = m3t_jsonl
    out = tmp_path / "shards"
    s = convert_jsonl(path, root, str(out / "s-%03d.tar"), workers=2, max_side=128, max_bytes_per_shard=1)
    assert (s.written, s.rejected) == (3, 4)
    assert s.reasons == {"json": 1, "duplicate_key": 1, "key": 1, "bad_path": 1}
    # max_bytes_per_shard=1: every sample gets its own shard, in input order
    assert [list(read_shard(out / f"s-{i:03d}.tar")) for i in range(3)] == [["big"], ["a"], ["b"]]
    big = read_shard(out / "s-000.tar")["big"]
    assert set(big) == {"jpg", "json"}  # resized, so re-encoded as JPEG
    im = Image.open(io.BytesIO(big["jpg"]))
    assert im.format == "JPEG" and max(im.size) == 128
    assert read_shard(out / "s-001.tar")["a"]["jpg"] == (root / "a.jpg").read_bytes()
    rejects = [json.loads(x) for x in (out / "rejects.jsonl").read_text().splitlines()]
    # JSONL rejects name the line, also the duplicate (found by the writer)
    assert [r["line"] for r in rejects] == [3, 4, 5, 6]
    assert rejects[1]["message"] == "line 4: record 'a': key already written"
