"""Demo fine-tuning pairs: the demo's digit split as MMEB-train-shaped rows, converted with the pair converter.

Every digit gets ``pairs_per_digit`` pairs drawn from four task kinds that mirror the demo's evaluation tasks:

- ``cls``: image + "What digit is written here?" -> "five."; hard negative: the answer for another digit;
- ``vqa``: image + a shape / parity / successor question -> its answer; hard negative: another digit's answer;
- ``i2t``: image + "Find a description of this scan." -> the digit's caption; hard negative: another caption;
- ``t2i``: a caption -> the scan (image-bearing positive, captioned); hard negative: a scan of another digit.

Rows use the released MMEB-train columns (``<|image_1|>`` markers, ``neg_text`` as the string form of a list,
JSON or Python style), and ``no_negative_frac`` of them have no hard negative, so the demo exercises the whole
conversion path. ``python -m muco.demo pairs [root]`` writes ``<root>/pairs/{train,val}/`` (the demo data under
``root`` is built first when missing).
"""

from __future__ import annotations

import json
import random
from pathlib import Path

from muco.convert.pairs import convert_pairs, parse_list
from muco.demo.build import build_demo_data, demo_ready
from muco.demo.digits import TURNS, Digit, load_digits_images, split

KINDS = ("cls", "vqa", "i2t", "t2i")
MARKER = "<|image_1|>\n"
IMAGE_TARGET = MARKER + "Represent the given image."


def caption(label: int) -> str:
    return TURNS[-1][2](label)


def _image(d: Digit) -> str:
    return f"{d.key}.png"


def mmeb_row(d: Digit, kind: str, other: Digit, rng: random.Random) -> dict:
    """One MMEB-train-shaped row for digit ``d``; ``other`` (another class) gives the hard negative."""
    row = {"key": f"{d.key}_{kind}", "qry_image_path": _image(d), "qry_sentence": caption(d.label),
           "pos_image_path": "", "pos_sentence": "", "neg_image_path": ""}
    if kind == "t2i":
        row.update(qry="Find an image that matches the given caption. " + caption(d.label), qry_image_path="",
                   qry_sentence="", pos_text=IMAGE_TARGET, pos_image_path=_image(d), pos_sentence=caption(d.label))
        negs, neg_images = [IMAGE_TARGET], [_image(other)]
    else:
        if kind == "cls":
            question, answer = "What digit is written here?", TURNS[0][2]
        elif kind == "vqa":
            _, questions, answer = TURNS[rng.choice([3, 4, 5])]
            question = rng.choice(questions)
        else:
            question, answer = "Find a description of this scan.", caption
        row.update(qry=MARKER + question, pos_text=answer(d.label))
        negs, neg_images = [answer(other.label)], []
    # the released files hold lists as strings: JSON-style or Python-style
    row["neg_text"] = json.dumps(negs) if rng.random() < 0.5 else str(negs)
    if neg_images:
        row["neg_image_path"] = str(neg_images)
    return row


def pair_rows(digits: list[Digit], seed: int = 0, pairs_per_digit: int = 2,
              no_negative_frac: float = 0.1) -> list[dict]:
    rng = random.Random(seed)
    by_label: dict[int, list[Digit]] = {}
    for d in digits:
        by_label.setdefault(d.label, []).append(d)
    rows = []
    for d in digits:
        for kind in rng.sample(KINDS, pairs_per_digit):
            while True:  # another class whose answer differs (parity answers repeat across classes)
                other = rng.choice(by_label[rng.choice([k for k in by_label if k != d.label])])
                row = mmeb_row(d, kind, other, rng)
                if kind == "t2i" or row["pos_text"] not in parse_list(row["key"], "neg_text", row["neg_text"]):
                    break
            if rng.random() < no_negative_frac:
                row["neg_text"], row["neg_image_path"] = "[]", ""
            rows.append(row)
    return rows


def build_demo_pairs(root: str | Path = "data/demo", seed: int = 0, pairs_per_digit: int = 2,
                     samples_per_shard: int = 500) -> Path:
    """``<root>/pairs/{train,val}/`` shards + manifests from the demo's train / held-out digits."""
    root = Path(root)
    if not demo_ready(root):
        build_demo_data(root, seed=seed)
    train, test = split(load_digits_images(), seed=seed)  # the split of build_demo_data
    out = root / "pairs"
    out.mkdir(parents=True, exist_ok=True)
    for name, part in (("train", train), ("val", test)):
        jsonl = out / f"{name}.jsonl"
        with open(jsonl, "w", encoding="utf-8") as f:
            for row in pair_rows(part, seed=seed + (name == "val"), pairs_per_digit=pairs_per_digit):
                f.write(json.dumps(row) + "\n")
        summary = convert_pairs(jsonl, root / "images", str(out / name / f"{name}-%06d.tar"),
                                max_samples_per_shard=samples_per_shard, overwrite=True)
        if summary.rejected:
            raise RuntimeError(f"demo pairs: {summary.rejected} rows rejected; see {summary.rejects}")
    return out

