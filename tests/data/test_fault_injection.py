"""Fault injection through `muco fit`: good samples mixed with 25 kinds of bad record and broken shard.

One non-resampled epoch must train every good sample exactly once, crash on none of the bad ones, list exactly
the bad ones with their reasons in the run directory's skipped.jsonl, and report the same count to TensorBoard
(including skips after a worker's last batch)."""

from __future__ import annotations

import copy
import io
import json
import tarfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from tests.records import jpeg, record_json
from tests.train.conftest import REPO, read_scalars, run_muco


def _png16(size: int = 64) -> bytes:
    arr = np.linspace(0, 65535, size * size).reshape(size, size).astype(np.uint16)
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    return buf.getvalue()


def _mutated(key: str, mutate) -> bytes:
    obj = copy.deepcopy(record_json(key))
    mutate(obj)
    return json.dumps(obj).encode()


def bad_samples(jpegs: list[bytes]) -> dict[str, list[tuple[str, bytes]]]:
    """key -> members of one bad sample each."""
    good_json = lambda k: json.dumps(record_json(k)).encode()  # noqa: E731
    wide = Image.new("RGB", (2000, 8), "white")
    out = {
        "corrupt_jpeg": [("jpg", b"\xff\xd8\xff not a jpeg"), ("json", good_json("corrupt_jpeg"))],
        "zero_byte_image": [("jpg", b""), ("json", good_json("zero_byte_image"))],
        "truncated_jpeg": [("jpg", jpegs[0][: len(jpegs[0]) // 3]), ("json", good_json("truncated_jpeg"))],
        "extreme_aspect": [("jpg", jpeg(wide)), ("json", good_json("extreme_aspect"))],
        "no_image": [("json", good_json("no_image"))],
        "no_json": [("jpg", jpegs[1])],
        "bad_json_bytes": [("jpg", jpegs[2]), ("json", b'{"turns": [')],
        "not_utf8": [("jpg", jpegs[2]), ("json", b'{"turns": "\xe9\xff"}')],
        "json_list": [("jpg", jpegs[2]), ("json", b"[1, 2, 3]")],
        "five_turns": [("jpg", jpegs[3]), ("json", json.dumps(record_json("five_turns", turns=5)).encode())],
        "eight_turns": [("jpg", jpegs[3]), ("json", json.dumps(record_json("eight_turns", turns=8)).encode())],
        "text_too_long": [("jpg", jpegs[4]), ("json", _mutated("text_too_long",
                                                               lambda o: o["turns"][2].update(target="x" * 5000)))],
    }
    mutations = {
        "queries_string": lambda o: o["turns"][3].update(queries="just a string"),
        "queries_empty": lambda o: o["turns"][1].update(queries=[]),
        "query_blank": lambda o: o["turns"][4]["queries"].__setitem__(1, "   "),
        "target_empty": lambda o: o["turns"][0].update(target=""),
        "target_int": lambda o: o["turns"][2].update(target=7),
        "target_emb_token": lambda o: o["turns"][5].update(target="the answer <|emb|>"),
        "query_chat_token": lambda o: o["turns"][6]["queries"].__setitem__(0, "<|im_start|>x"),
        "query_image_marker": lambda o: o["turns"][0]["queries"].__setitem__(0, "a <|image_1|> b"),
        "caption_mask_token": lambda o: o.update(caption="<|mask|> caption"),
        "turns_string": lambda o: o.update(turns="nope"),
        "turn_without_target": lambda o: o["turns"][0].pop("target"),
    }
    for i, (key, mutate) in enumerate(mutations.items()):
        out[key] = [("jpg", jpegs[i % len(jpegs)]), ("json", _mutated(key, mutate))]
    return out


def write_tar(path: Path, samples: list[tuple[str, list[tuple[str, bytes]]]]) -> None:
    with tarfile.open(path, "w") as tar:
        for key, members in samples:
            for ext, data in members:
                info = tarfile.TarInfo(f"{key}.{ext}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))


@pytest.mark.slow
def test_every_good_sample_trains_once_and_every_bad_one_is_listed(tmp_path, jpegs):
    shards = tmp_path / "shards"
    shards.mkdir()
    bad = bad_samples(jpegs)
    good = [f"good{i:02d}" for i in range(16)]
    samples = [(k, [("jpg", jpegs[i % len(jpegs)]), ("json", json.dumps(record_json(k)).encode())])
               for i, k in enumerate(good)]
    samples[3] = (good[3], [("png", _png16()), ("json", json.dumps(record_json(good[3])).encode())])  # 16-bit
    mixed = samples[:8] + list(bad.items()) + samples[8:12]
    write_tar(shards / "s-000.tar", mixed[: len(mixed) // 2])
    write_tar(shards / "s-001.tar", mixed[len(mixed) // 2 :])
    write_tar(shards / "s-002.tar", samples[12:14] + [("cut", samples[14][1])])  # truncated inside "cut"
    with tarfile.open(shards / "s-002.tar") as tar:
        cut = tar.getmember("cut.jpg")
    data = (shards / "s-002.tar").read_bytes()
    (shards / "s-002.tar").write_bytes(data[: cut.offset_data + cut.size // 2])
    good.remove(good[14])  # its copy "cut" is what the truncation hits; good14 itself is never written
    write_tar(shards / "s-003.tar", [samples[15]])
    (shards / "s-004.tar").write_bytes(b"this is not a tar file at all" * 20)  # broken shard
    write_tar(shards / "s-005.tar", [])  # an empty shard: nothing to skip
    expected_bad = set(bad) | {"cut"}

    run = tmp_path / "run"
    res = run_muco("fit", "--config", str(REPO / "configs" / "tiny.yaml"),
                   f"--data.init_args.train_shards={shards}/s-{{000..005}}.tar", "--data.init_args.val_shards=null",
                   "--data.init_args.resampled=false", "--data.init_args.samples_per_epoch=null",
                   "--data.init_args.batch_size=1", "--data.init_args.num_workers=2",
                   "--data.init_args.records.init_args.turns_per_record=7",
                   "--data.init_args.records.init_args.max_text_chars=4096",
                   "--trainer.max_epochs=1", "--trainer.max_steps=-1", "--trainer.log_every_n_steps=1",
                   "--trainer.limit_val_batches=0", "--trainer.enable_progress_bar=false",
                   "--trainer.callbacks+=muco.train.callbacks.SampleKeyLog", f"--trainer.default_root_dir={run}",
                   cwd=tmp_path)
    assert res.returncode == 0, res.stderr[-4000:]
    trained = [k for line in (run / "sample_keys.rank0.jsonl").read_text().splitlines()
               for k in json.loads(line)["keys"]]
    assert sorted(trained) == sorted(good), "every good sample exactly once"
    skipped = [json.loads(line) for line in (run / "skipped.jsonl").read_text().splitlines()]
    keyed = {s["key"]: s for s in skipped if s["key"] is not None}
    assert set(keyed) == expected_bad and len(keyed) == len([s for s in skipped if s["key"] is not None])
    unreadable = [s for s in skipped if s["key"] is None]
    assert len(unreadable) == 1 and unreadable[0]["shard"].endswith("s-004.tar")  # the non-tar file
    assert all(s["reason"] and s["shard"] for s in skipped)
    assert "has 8 turns, expected 7" in keyed["eight_turns"]["reason"]
    assert "max_text_chars" in keyed["text_too_long"]["reason"]
    total = read_scalars(run)["train/skipped_samples_total"][-1][1]
    assert total == len(skipped), "TensorBoard counts every skip, also those after a worker's last batch"
