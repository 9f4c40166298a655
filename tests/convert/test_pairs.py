"""Pair conversion from the MMEB-train layout (parquet and JSONL) and from pair-record JSONL."""

from __future__ import annotations

import io
import json
import tarfile

import pytest
from PIL import Image

from muco.convert.pairs import convert_pairs, parse_list
from muco.data.pairs.records import PairRecord
from muco.data.records import RecordError

CAP_Q, CAP_P = "an astronaut in a white suit", "a cat looking up"


@pytest.fixture
def image_root(tmp_path, photos):
    root = tmp_path / "imgs"
    (root / "sub").mkdir(parents=True)
    for i, p in enumerate(photos[:4]):
        p.save(root / "sub" / f"p{i}.jpg", quality=85)
    return root


def mmeb_rows() -> list[dict]:
    """Five MMEB-train-shaped rows: lists, string forms (JSON and Python), clamped and empty negatives."""
    base = {"qry_image_path": "sub/p0.jpg", "pos_image_path": "", "qry_sentence": CAP_Q, "pos_sentence": ""}
    return [
        {**base, "qry": "<|image_1|>\nWhat is the person wearing?\n", "pos_text": "a space suit",
         "neg_text": ["a dress", "a space suit"], "neg_image_path": []},
        {**base, "qry": "<|image_1|>\nWhat is it?", "pos_text": "an astronaut",
         "neg_text": "['a diver', \"a pilot's suit\"]", "neg_image_path": ""},
        {**base, "qry": "Find the picture: a cat", "qry_image_path": "", "qry_sentence": "",
         "pos_text": "<|image_1|>\nRepresent the given image.", "pos_image_path": "sub/p1.jpg", "pos_sentence": CAP_P,
         "neg_text": '["<|image_1|>\\nRepresent the given image.", "<|image_1|>\\nRepresent the given image."]',
         "neg_image_path": '["sub/p2.jpg"]'},
        {**base, "qry": "<|image_1|>\nNo caption here", "pos_text": "x", "qry_sentence": "",
         "neg_text": "[]", "neg_image_path": "[]"},
        {**base, "qry": "<|image_1|>\nq", "pos_text": "y", "neg_text": "", "neg_image_path": None},
    ]


def read_shards(manifest) -> dict[str, dict[str, bytes]]:
    out: dict[str, dict[str, bytes]] = {}
    for shard in json.loads(manifest.read_text())["shards"]:
        with tarfile.open(manifest.parent / shard["name"]) as tar:
            for m in tar.getmembers():
                key, ext = m.name.split(".", 1)
                out.setdefault(key, {})[ext] = tar.extractfile(m).read()
    return out


def check_converted(out_dir, key_of):
    rejects = [json.loads(x) for x in (out_dir / "rejects.jsonl").read_text().splitlines()]
    assert rejects[0]["key"] == key_of(3) and rejects[0]["reason"] == "missing_caption"
    assert "query.caption is missing" in rejects[0]["message"]
    manifest = json.loads((out_dir / "manifest.json").read_text())
    assert manifest["kind"] == "pairs" and (manifest["num_samples"], manifest["rejected"]) == (4, 1)
    samples = read_shards(out_dir / "manifest.json")
    recs = {k: PairRecord.from_json(k, v["json"]) for k, v in samples.items()}

    r0 = recs[key_of(0)]
    assert (r0.query.text, r0.query.image, r0.query.caption) == ("What is the person wearing?\n", "qry.jpg", CAP_Q)
    # the negative equal to the positive is dropped (the released code lets a positive be its own negative,
    # docs/method.md §14)
    assert [n.text for n in r0.negatives] == ["a dress"] and r0.positive.image is None
    assert Image.open(io.BytesIO(samples[key_of(0)]["qry.jpg"])).size == (96, 96)
    assert [n.text for n in recs[key_of(1)].negatives] == ["a diver", "a pilot's suit"]  # Python-style list
    r2 = recs[key_of(2)]
    assert r2.query.image is None and r2.query.text == "Find the picture: a cat"
    assert (r2.positive.text, r2.positive.image, r2.positive.caption) == ("Represent the given image.", "pos.jpg",
                                                                           CAP_P)
    # neg_image_path is clamped: both negatives use its only image, stored once
    assert [(n.text, n.image) for n in r2.negatives] == [("Represent the given image.", "neg0.jpg")] * 2
    assert set(samples[key_of(2)]) == {"json", "pos.jpg", "neg0.jpg"}
    assert recs[key_of(4)].negatives == []


def test_mmeb_parquet(tmp_path, image_root):
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    rows = mmeb_rows()
    # parquet needs one type per column: list columns as lists of strings or their string form
    cols = {c: [r[c] for r in rows] for c in rows[0]}
    cols["neg_text"] = [r["neg_text"] if isinstance(r["neg_text"], str) else json.dumps(r["neg_text"])
                        for r in rows]
    cols["neg_image_path"] = [r["neg_image_path"] if isinstance(r["neg_image_path"], str) else "[]" for r in rows]
    sub = tmp_path / "MMEB_train" / "VOC2007"
    sub.mkdir(parents=True)
    pq.write_table(pa.table(cols), sub / "train.parquet")
    out = tmp_path / "out"
    summary = convert_pairs([sub / "train.parquet"], image_root, str(out / "p-%06d.tar"), max_samples_per_shard=3)
    assert len(summary.shards) == 2 and (summary.written, summary.rejected) == (4, 1)
    check_converted(out, lambda i: f"VOC2007_train_{i:09d}")


def test_mmeb_jsonl_and_cli(tmp_path, image_root):
    from muco.cli import main

    src = tmp_path / "mmeb.jsonl"
    src.write_text("".join(json.dumps(r) + "\n" for r in mmeb_rows()))
    out = tmp_path / "out"
    rc = main(["data", "convert", "--kind", "pairs", str(src), "--image-root", str(image_root),
               "--output", str(out / "p-%06d.tar")])
    assert rc == 0
    check_converted(out, lambda i: f"mmeb_{i + 1:09d}")


def test_pair_record_jsonl_and_image_errors(tmp_path, image_root):
    lines = [
        {"key": "a1", "query": {"text": "q", "image": "sub/p0.jpg", "caption": CAP_Q}, "positive": {"text": "p"},
         "negatives": [{"text": "n", "image": "sub/p3.jpg"}]},
        {"key": "a2", "query": {"text": "q"}, "positive": {"text": "p", "image": "sub/missing.jpg", "caption": "c"}},
        {"key": "a3", "query": {"text": "q <|emb|>"}, "positive": {"text": "p"}},
        {"query": {"text": "q"}, "positive": {"text": "p"}},
    ]
    src = tmp_path / "pairs.jsonl"
    src.write_text("".join(json.dumps(x) + "\n" for x in lines))
    summary = convert_pairs(src, image_root, str(tmp_path / "o" / "p-%06d.tar"), max_negatives=1)
    assert (summary.written, summary.rejected) == (1, 3)
    rej = {r["key"]: r for r in map(json.loads, (tmp_path / "o" / "rejects.jsonl").read_text().splitlines())}
    assert rej["a2"]["reason"] == "missing_image" and "positive.image" in rej["a2"]["message"]
    assert rej["a3"]["reason"] == "reserved" and "query.text" in rej["a3"]["message"]
    assert rej["pairs_000000004"]["reason"] == "key"
    rec = PairRecord.from_json("a1", read_shards(tmp_path / "o" / "manifest.json")["a1"]["json"])
    assert rec.negatives[0].image == "neg0.jpg"


def test_parse_list_is_data_only():
    assert parse_list("k", "neg_text", '["a", "b"]') == ["a", "b"]
    assert parse_list("k", "neg_text", "['a', \"b's\"]") == ["a", "b's"]  # Python-style string form
    assert parse_list("k", "neg_text", "a plain negative") == ["a plain negative"]
    assert parse_list("k", "neg_text", "") == [] and parse_list("k", "neg_text", None) == []
    with pytest.raises(RecordError, match="neg_text looks like a list"):
        parse_list("k", "neg_text", "[__import__('os').system('true')]")  # never evaluated
    with pytest.raises(RecordError, match=r"neg_text\[1\] must be a string"):
        parse_list("k", "neg_text", "[\"a\", 3]")
