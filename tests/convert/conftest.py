"""Fixtures for the conversion tests (JPEGs and record JSON come from tests/conftest.py): a parquet shaped like the
released M3T.parquet and a JSONL of M3T records with good and bad lines."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image


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
    pa = pytest.importorskip("pyarrow")
    pq = pytest.importorskip("pyarrow.parquet")
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


@pytest.fixture
def m3t_jsonl(tmp_path: Path, rec_json, photos) -> tuple[Path, Path]:
    """(records.jsonl, image root): 3 good lines, a broken one, a duplicate key, one without a key and one whose
    image path leaves the image root; the first image (288 px wide) is a PNG."""
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
