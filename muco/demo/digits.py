"""scikit-learn's 1,797 real handwritten digit scans as M3T-shaped records and MMEB-format eval tasks.

Every image gets the 7 M3T task types (docs/method.md §2.1) with texts derived from its label, so the demo exercises
the same multi-turn pipeline as M3T. The split is fixed by a seed.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

import numpy as np
from PIL import Image

WORDS = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]
SHAPES = [
    "a closed oval loop", "a single upright stroke", "a curve that ends in a flat base",
    "two stacked open curves", "a crossed angular shape", "a flat top over a round belly",
    "a loop at the bottom under a curved stem", "a flat top and a slanted stem",
    "two loops stacked on each other", "a loop at the top over a straight tail",
]
# (task, candidate queries, target builder)
TURNS = [
    ("cls", ["What digit is written here?", "Which number is shown?", "Name the handwritten numeral."],
     lambda d: f"{WORDS[d]}."),
    ("vqa_global", ["Describe the whole picture in a few words.", "What does the scene show overall?"],
     lambda d: f"a single handwritten {WORDS[d]} on a dark background."),
    ("vqa_global", ["What kind of image is this?", "Summarise the scan."],
     lambda d: f"a low resolution scan of the digit {d}."),
    ("vqa_local", ["What shape does the stroke trace?", "How is the character drawn?"],
     lambda d: SHAPES[d] + "."),
    ("vqa_local", ["Is the numeral even or odd?", "Tell the parity of the written number."],
     lambda d: f"it is {'even' if d % 2 == 0 else 'odd'}."),
    ("vqa_creative", ["Which number comes right after this one?", "Add one to the written value."],
     lambda d: f"{WORDS[(d + 1) % 10]} comes next."),
    ("ret", ["Describe the scan in detail.", "Write a detailed description."],
     lambda d: f"a handwritten digit {WORDS[d]} ({d}) in white strokes on black, drawn as {SHAPES[d]}."),
]
TASK_NAMES = [t[0] for t in TURNS]


@dataclass
class Digit:
    key: str
    label: int
    image: Image.Image


def load_digits_images(size: int = 56) -> list[Digit]:
    """The bundled 8x8 scans, upsampled to `size` px RGB (56 px = 4 merged visual tokens)."""
    from sklearn.datasets import load_digits

    ds = load_digits()
    out = []
    for i, (img, label) in enumerate(zip(ds.images, ds.target)):
        arr = (np.asarray(img) / 16.0 * 255).astype(np.uint8)
        im = Image.fromarray(arr, mode="L").resize((size, size), Image.Resampling.BICUBIC).convert("RGB")
        out.append(Digit(key=f"digit{i:04d}", label=int(label), image=im))
    return out


def split(digits: list[Digit], held_out: int = 297, seed: int = 0) -> tuple[list[Digit], list[Digit]]:
    order = list(range(len(digits)))
    random.Random(seed).shuffle(order)
    test = {i for i in order[:held_out]}
    return [d for i, d in enumerate(digits) if i not in test], [d for i, d in enumerate(digits) if i in test]


def record(d: Digit) -> dict:
    """Our record schema (docs/method.md §2.3) for one digit; the image is stored next to it.

    Texts end with a newline, as MMEB-format evaluation texts do (docs/method.md §12), so the demo's short answers
    ("five.") look the same in training turns and as evaluation candidates.
    """
    return {
        "key": d.key,
        "turns": [{"task": t, "queries": [q + "\n" for q in qs], "target": fn(d.label) + "\n"}
                  for t, qs, fn in TURNS],
        "caption": TURNS[-1][2](d.label),
    }


def eval_tasks(test: list[Digit], image_dir: str, seed: int = 0) -> dict[str, list[dict]]:
    """MMEB_Test_Instruct-shaped rows (gold candidate first) for four demo tasks."""
    rng = random.Random(seed)
    labels = [f"{w}." for w in WORDS]
    tasks: dict[str, list[dict]] = {"Digits-CLS": [], "Digits-VQA": [], "Digits-I2T": [], "Digits-T2I": []}
    by_label: dict[int, list[Digit]] = {}
    for d in test:
        by_label.setdefault(d.label, []).append(d)
    for d in test:
        path = f"{image_dir}/{d.key}.png"
        gold = labels[d.label]
        tasks["Digits-CLS"].append(_row("<|image_1|> What digit is written here?", "", path,
                                        [gold] + [c for c in labels if c != gold], []))
        task, qs, fn = TURNS[rng.choice([3, 4, 5])]
        answers = sorted({fn(k) for k in range(10)} - {fn(d.label)})
        tasks["Digits-VQA"].append(_row(f"<|image_1|> {rng.choice(qs)}", "", path, [fn(d.label)] + answers, []))
        captions = [TURNS[-1][2](k) for k in range(10)]
        gold_cap = captions[d.label]
        tasks["Digits-I2T"].append(_row("<|image_1|> Find a description of this scan.", "", path,
                                        [gold_cap] + [c for c in captions if c != gold_cap], []))
    for d in test:
        # text -> image: the gold scan among one scan of every other digit
        others = [rng.choice(by_label[k]) for k in sorted(by_label) if k != d.label]
        cands = [d] + others
        tasks["Digits-T2I"].append({
            "qry_inst": "Find an image that matches the given caption.",
            "qry_text": TURNS[-1][2](d.label), "qry_img_path": "",
            "tgt_inst": "Represent the given image.",
            "tgt_text": [""] * len(cands),
            "tgt_img_path": [f"{image_dir}/{c.key}.png" for c in cands],
        })
    return tasks


def _row(inst: str, text: str, img: str, tgt_text: list[str], tgt_img: list[str]) -> dict:
    return {"qry_inst": inst, "qry_text": text, "qry_img_path": img, "tgt_inst": "",
            "tgt_text": tgt_text, "tgt_img_path": tgt_img or [""] * len(tgt_text)}
