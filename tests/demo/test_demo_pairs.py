"""Demo fine-tuning pairs: MMEB-train-shaped rows from the demo split, converted with the pair converter."""

from __future__ import annotations

import json
from collections import Counter

from tests.data.builders import pair_data


def test_demo_pairs_cover_the_eval_task_kinds(demo_data):
    from muco.demo.pairs import build_demo_pairs

    out = build_demo_pairs(demo_data)
    train = json.loads((out / "train" / "manifest.json").read_text())
    val = json.loads((out / "val" / "manifest.json").read_text())
    assert (train["kind"], train["num_samples"], train["rejected"]) == ("pairs", 3000, 0)  # 1,500 digits x 2
    assert val["num_samples"] == 2 * 297
    rows = [json.loads(x) for x in (out / "train.jsonl").read_text().splitlines()]
    kinds = Counter(r["key"].rsplit("_", 1)[1] for r in rows)
    assert set(kinds) == {"cls", "vqa", "i2t", "t2i"} and min(kinds.values()) > 500
    assert all(r["qry"].startswith("<|image_1|>\n") or r["pos_image_path"] for r in rows)
    no_neg = sum(r["neg_text"] == "[]" for r in rows)
    assert 0.05 * len(rows) < no_neg < 0.15 * len(rows)

    dm = pair_data(str(out / "train" / "manifest.json"), batch_size=16, num_workers=0, tokenizer="tiny",
                        samples_per_epoch=32, shuffle_buffer=50)
    dm.setup("fit")
    batch = next(iter(dm.make_dataset("train")))
    assert len(batch["keys"]) == 16 and batch["query"]["input_ids"].shape[0] == 16
    assert batch["negative_valid"].any()
