from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from muco.cli.convert import main
from muco.convert.pipeline import convert_jsonl, convert_parquet
from muco.convert import pipeline as convert
from muco.data.m3t.records import M3T_TASKS

pa = pytest.importorskip("pyarrow")
pq = pytest.importorskip("pyarrow.parquet")


def read_shard(path: Path) -> dict[str, dict[str, bytes]]:
    out: dict[str, dict[str, bytes]] = {}
    with tarfile.open(path) as tar:
        for m in tar.getmembers():
            key, ext = m.name.split(".", 1)
            out.setdefault(key, {})[ext] = tar.extractfile(m).read()
    return out


def released_row(r: int, image: str, turns: int = 7) -> dict:
    return {
        "qry": [[f"<|image_1|>\nr{r} q{i} a", f"<|image_1|>r{r} q{i} b", f"r{r} q{i} c"]
                for i in range(turns)],
        "pos_text": [f"r{r} t{i}" for i in range(turns)],
        "qry_image_path": image,
        "qry_sentence": f"caption of r{r}",
        "neg_text": [f"neg {i}" for i in range(turns)],
        "pos_sentence": [f"pos sentence {i}" for i in range(turns)],
    }


@pytest.fixture
def released(tmp_path: Path, jpegs, photos):
    """A parquet shaped like M3T.parquet, 6 good rows and 6 bad ones, plus its image root."""
    root = tmp_path / "images"
    (root / "imgs").mkdir(parents=True)
    rows = []
    for r in range(5):
        (root / f"imgs/{r}.jpg").write_bytes(jpegs[r])
        rows.append(released_row(r, f"imgs/{r}.jpg"))
    photos[5].save(root / "imgs/5.png")
    rows.append(released_row(5, "imgs/5.png"))
    rows.append(released_row(6, "imgs/missing.jpg"))  # missing_image
    rows.append(released_row(7, "imgs/0.jpg", turns=5))  # turn_count
    rows.append(released_row(8, "imgs/0.jpg"))
    rows[-1]["qry"][3][1] = "<|image_1|>\n"  # empty once the marker is stripped
    rows.append(released_row(9, "imgs/0.jpg"))
    rows[-1]["pos_text"][2] = "answer <|emb|>"  # reserved
    (root / "imgs/garbage.jpg").write_bytes(b"not an image at all")
    rows.append(released_row(10, "imgs/garbage.jpg"))  # bad_image
    (root / "imgs/trunc.jpg").write_bytes(jpegs[1][: len(jpegs[1]) // 2])
    rows.append(released_row(11, "imgs/trunc.jpg"))  # bad_image (Image.open accepts it; load() does not)
    path = tmp_path / "M3T.parquet"
    pq.write_table(pa.Table.from_pylist(rows), path, row_group_size=4)
    return path, root


def test_convert_released_parquet(released, tmp_path, jpegs):
    path, root = released
    out = tmp_path / "out"
    s = convert_parquet(path, root, str(out / "train-%06d.tar"), max_samples_per_shard=4, batch_rows=3)
    assert (s.written, s.rejected) == (6, 6)
    assert s.reasons == {"missing_image": 1, "turn_count": 1, "empty": 1, "reserved": 1, "bad_image": 2}
    assert sorted(p.name for p in out.iterdir()) == [
        "manifest.json", "rejects.jsonl", "train-000000.tar", "train-000001.tar"]
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


def _jsonl(tmp_path: Path, rec_json, photos) -> tuple[Path, Path]:
    root = tmp_path / "img"
    root.mkdir()
    big = Image.fromarray(np.tile(np.asarray(photos[1]), (3, 3, 1)))  # 288 px wide
    big.save(root / "big.png")
    photos[0].save(root / "a.jpg", quality=90)
    lines = [
        json.dumps({"key": "big", "image": "big.png", **rec_json("big")}),
        json.dumps({"key": "a", "image": "a.jpg", **rec_json("a", turns=7)}),
        "{broken json",
        json.dumps({"key": "a", "image": "a.jpg", **rec_json("a")}),  # duplicate key
        json.dumps({"image": "a.jpg", **rec_json("nokey")}),
        json.dumps({"key": "esc", "image": "../a.jpg", **rec_json("esc")}),
        json.dumps({"key": "b", "image": "a.jpg", **rec_json("b")}),
    ]
    path = tmp_path / "records.jsonl"
    path.write_text("\n".join(lines) + "\n")
    return path, root


def test_convert_jsonl_with_pool_and_max_side(tmp_path, rec_json, photos):
    path, root = _jsonl(tmp_path, rec_json, photos)
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


def test_failed_conversion_leaves_no_half_shard(tmp_path, rec_json, photos, monkeypatch):
    path, root = _jsonl(tmp_path, rec_json, photos)
    real = convert.prepare_item

    def fail_on_b(kind, index, payload, key, opts):
        if '"key": "b"' in payload:
            raise RuntimeError("disk full")
        return real(kind, index, payload, key, opts)

    monkeypatch.setattr(convert, "prepare_item", fail_on_b)
    out = tmp_path / "o"
    with pytest.raises(RuntimeError, match="disk full"):
        convert_jsonl(path, root, str(out / "s-%03d.tar"), max_samples_per_shard=10)
    assert not list(out.glob("*.tar*"))  # the open shard was removed; nothing half-written remains


def test_cli(tmp_path, released, capsys):
    path, root = released
    argv = [str(path), "--image-root", str(root), "--output", str(tmp_path / "c/t-%06d.tar"),
            "--workers", "0",
            "--max-samples-per-shard", "100"]
    assert main(argv) == 0
    assert "wrote 6 samples into 1 shards; rejected 6" in capsys.readouterr().out
    assert main(argv) == 2  # refuses to overwrite
    assert "--overwrite" in capsys.readouterr().err
    assert main([*argv, "--overwrite", "--turns", "5"]) == 0
    assert "wrote 1 samples" in capsys.readouterr().out  # only the 5-turn row matches --turns 5
