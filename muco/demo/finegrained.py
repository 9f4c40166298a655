"""A fine-grained offline benchmark where hard negatives matter (``python -m muco.demo finegrained [root]``).

Every scene is an 84x84 black canvas split into a 2x2 grid of 42 px cells; 1 to 3 of scikit-learn's real
handwritten digit scans sit in distinct cells, each drawn in one of 4 colours and at one of 2 sizes. Texts describe
those details (which digit, colour, size, cell, how many), so two scenes -- and two descriptions -- can differ in a
single detail. The 3,000 training scenes have ~2,900 distinct descriptions (~4,000 distinct targets with the shorter
answers): a 64-image batch sees about 5 % of them, so in-batch negatives are mostly easy (other scenes differ in many
details) and the hard ones (one detail off) have to be found in the corpus -- the case mined negatives are for.

Layout under ``root`` (default ``data/finegrained``), mirroring the demo (:mod:`muco.demo.build`):

- ``train/``, ``val/``: M3T shards written by the demo's converter (:func:`muco.convert.m3t.convert_jsonl`),
  6 turns per scene (:data:`TURNS`), from the demo's training / held-out digit scans respectively;
- ``eval/tasks.yaml`` + ``eval/FG-*.jsonl``: three held-out MMEB-format tasks, 200 queries each, 8 candidates
  each (chance 1/8), gold candidate first:

  * FG-I2T: a scene -> its description among 7 descriptions that each differ from it in exactly one detail;
  * FG-T2I: a description -> its scene among 7 scenes that each differ in exactly one detail;
  * FG-CLS: a scene + a question about one cell ("What is at the top left?") or about the count and digits
    ("How many digits are there and which?") -> the answer among 7 answers one detail away.

Held-out scenes use only held-out scans, and no training scene is one an eval task names (as query or as
distractor), so no candidate has the advantage of having been seen in training.
Everything is a pure function of ``seed``.
"""

from __future__ import annotations

import itertools
import random
from collections.abc import Callable, Container, Iterable, Iterator, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from muco.demo.build import write_split, write_tasks
from muco.demo.digits import WORDS, load_digits_images, split

CANVAS = 84
CELL = CANVAS // 2
CELLS = ["top left", "top right", "bottom left", "bottom right"]
COLOURS = {"red": (255, 60, 60), "green": (60, 220, 60), "blue": (70, 120, 255), "yellow": (255, 225, 0)}
COLOUR_NAMES = list(COLOURS)
SIZES = ["small", "large"]
SIZE_PX = [22, 38]
COUNT_WORDS = ["no", "one", "two", "three"]
MAX_DIGITS = 3
TASKS = ("FG-I2T", "FG-T2I", "FG-CLS")
EVAL_META = {"FG-I2T": "retrieval", "FG-T2I": "retrieval", "FG-CLS": "classification"}
EVAL_CANDIDATES = {"FG-I2T": "text", "FG-T2I": "image", "FG-CLS": "text"}
N_CANDIDATES = 8
CELL_QUESTION = "What is at the {}?"
COUNT_QUESTION = "How many digits are there and which?"
I2T_QUESTION = "Describe the picture in detail."


@dataclass(frozen=True, order=True)
class Obj:
    """One digit of a scene; ``colour`` / ``size`` / ``cell`` index :data:`COLOUR_NAMES`, :data:`SIZES`,
    :data:`CELLS`."""

    cell: int
    digit: int
    colour: int
    size: int


Scene = tuple[Obj, ...]  # objects sorted by cell (reading order), distinct cells


def make_scene(objs: Sequence[Obj]) -> Scene:
    cells = [o.cell for o in objs]
    if len(set(cells)) != len(cells) or not 1 <= len(objs) <= MAX_DIGITS:
        raise ValueError(f"a scene holds 1..{MAX_DIGITS} digits in distinct cells, got {objs}")
    return tuple(sorted(objs))


# ------------------------------------------------------------------ texts
def _article(word: str) -> str:
    return "an" if word == "eight" else "a"  # "a one": the sound, not the letter


def _join(parts: Sequence[str]) -> str:
    return parts[0] if len(parts) == 1 else ", ".join(parts[:-1]) + " and " + parts[-1]


def _count(n: int) -> str:
    return f"{COUNT_WORDS[n]} digit{'s' if n != 1 else ''}"


def object_phrase(o: Obj) -> str:
    """``a large red three`` (no cell)."""
    return f"a {SIZES[o.size]} {COLOUR_NAMES[o.colour]} {WORDS[o.digit]}"


def caption(scene: Scene) -> str:
    """The full description: ``two digits: a large red three at the top left and a small blue seven at the
    bottom right.`` Objects in reading order, so every scene has exactly one caption and back."""
    return f"{_count(len(scene))}: " + _join([f"{object_phrase(o)} at the {CELLS[o.cell]}" for o in scene]) + "."


def cell_answer(scene: Scene, cell: int) -> str:
    obj = next((o for o in scene if o.cell == cell), None)
    return "nothing." if obj is None else object_phrase(obj) + "."


def count_answer(digits: Sequence[int]) -> str:
    """``two digits: a three and an eight.`` for the digits in reading order."""
    return f"{_count(len(digits))}: " + _join([f"{_article(WORDS[d])} {WORDS[d]}" for d in digits]) + "."


def colours_answer(scene: Scene) -> str:
    return _join([COLOUR_NAMES[c] for c in sorted({o.colour for o in scene})]) + "."


def empty_answer(scene: Scene) -> str:
    empty = [c for c in range(len(CELLS)) if all(o.cell != c for o in scene)]
    return "none." if not empty else _join([f"the {CELLS[c]}" for c in empty]) + "."


def parse_object(text: str) -> tuple[int, int, int]:
    """``a large red three`` -> (digit, colour, size)."""
    _, size, colour, word = text.strip().rstrip(".").split(" ")
    return WORDS.index(word), COLOUR_NAMES.index(colour), SIZES.index(size)


def parse_caption(text: str) -> Scene:
    """The inverse of :func:`caption`."""
    _, body = text.strip().rstrip(".").split(": ", 1)
    objs = []
    for part in body.replace(" and ", ", ").split(", "):
        phrase, cell = part.split(" at the ")
        digit, colour, size = parse_object(phrase)
        objs.append(Obj(CELLS.index(cell), digit, colour, size))
    return make_scene(objs)


def parse_count(text: str) -> tuple[int, ...]:
    """The inverse of :func:`count_answer`."""
    _, body = text.strip().rstrip(".").split(": ", 1)
    return tuple(WORDS.index(p.split(" ")[1]) for p in body.replace(" and ", ", ").split(", "))


# ------------------------------------------------------------------ one-detail differences
def _pair_cost(a: Obj, b: Obj) -> int:
    return (a.cell != b.cell) + (a.digit != b.digit) + (a.colour != b.colour) + (a.size != b.size)


def scene_differences(a: Scene, b: Scene) -> int:
    """How many details tell two scenes apart: the cheapest matching of their objects, one per differing
    attribute (digit, colour, size, cell) of a matched pair and one per unmatched object (the count)."""
    if len(a) < len(b):
        a, b = b, a
    best = None
    for chosen in itertools.permutations(range(len(a)), len(b)):
        cost = sum(_pair_cost(a[i], o) for i, o in zip(chosen, b)) + len(a) - len(b)
        best = cost if best is None else min(best, cost)
    return best if best is not None else len(a)


def sequence_differences(a: Sequence[int], b: Sequence[int]) -> int:
    """Edit distance of two digit sequences (substitutions, insertions, deletions)."""
    prev = list(range(len(b) + 1))
    for i, x in enumerate(a, 1):
        cur = [i]
        for j, y in enumerate(b, 1):
            cur.append(min(prev[j] + 1, cur[j - 1] + 1, prev[j - 1] + (x != y)))
        prev = cur
    return prev[-1]


def scene_variants(scene: Scene, rng: random.Random) -> dict[str, list[Scene]]:
    """Every scene one detail away from ``scene``, by kind of detail: digit, colour, size, position (a digit moved
    to an empty cell) and count (a digit removed, or one added in an empty cell with drawn attributes)."""
    out: dict[str, list[Scene]] = {"digit": [], "colour": [], "size": [], "position": [], "count": []}
    empty = [c for c in range(len(CELLS)) if all(o.cell != c for o in scene)]
    for i, o in enumerate(scene):
        rest = scene[:i] + scene[i + 1:]
        out["digit"] += [make_scene([*rest, replace(o, digit=d)]) for d in range(10) if d != o.digit]
        out["colour"] += [make_scene([*rest, replace(o, colour=c)]) for c in range(len(COLOURS)) if c != o.colour]
        out["size"].append(make_scene([*rest, replace(o, size=1 - o.size)]))
        out["position"] += [make_scene([*rest, replace(o, cell=c)]) for c in empty]
        if len(scene) > 1:
            out["count"].append(make_scene(rest))
    if len(scene) < MAX_DIGITS:
        for c in empty:
            out["count"].append(make_scene([*scene, Obj(c, rng.randrange(10), rng.randrange(len(COLOURS)),
                                                         rng.randrange(len(SIZES)))]))
    return out


def object_variants(o: Obj) -> dict[str, list[Obj]]:
    """The objects one attribute away from ``o`` (same cell)."""
    return {"digit": [replace(o, digit=d) for d in range(10) if d != o.digit],
            "colour": [replace(o, colour=c) for c in range(len(COLOURS)) if c != o.colour],
            "size": [replace(o, size=1 - o.size)]}


def sequence_variants(digits: Sequence[int]) -> dict[str, list[tuple[int, ...]]]:
    """Digit sequences one edit away (at most :data:`MAX_DIGITS` long, at least one digit)."""
    d = tuple(digits)
    out: dict[str, list[tuple[int, ...]]] = {
        "digit": [d[:i] + (x,) + d[i + 1:] for i in range(len(d)) for x in range(10) if x != d[i]],
        "count": [d[:i] + d[i + 1:] for i in range(len(d)) if len(d) > 1],
    }
    if len(d) < MAX_DIGITS:
        out["count"] += [d[:i] + (x,) + d[i:] for i in range(len(d) + 1) for x in range(10)]
    return {k: sorted(set(v) - {d}) for k, v in out.items()}


def pick_balanced(groups: dict[str, list], n: int, rng: random.Random, key: Callable = lambda x: x) -> list:
    """``n`` distinct items drawn round-robin over the groups (each kind of detail about equally often)."""
    pools = {k: rng.sample(v, len(v)) for k, v in groups.items() if v}
    seen: set = set()
    out: list = []
    while len(out) < n and any(pools.values()):
        for k in list(pools):
            while pools[k]:
                item = pools[k].pop()
                if key(item) not in seen:
                    seen.add(key(item))
                    out.append(item)
                    break
            if len(out) == n:
                break
    if len(out) < n:
        raise ValueError(f"only {len(out)} distinct variants, need {n}")
    return out


# ------------------------------------------------------------------ rendering
@dataclass(frozen=True)
class Picture:
    """A scene with the scan drawn for each object (indices into the scan pool of the object's digit)."""

    scene: Scene
    scans: tuple[int, ...]


class Renderer:
    """Draws pictures from a pool of real scans (the demo's split), grey levels tinted by the object colour."""

    def __init__(self, keys: set[str]) -> None:
        self.pools: dict[tuple[int, int], list[np.ndarray]] = {}
        for size, px in enumerate(SIZE_PX):
            for d in load_digits_images(px):
                if d.key in keys:
                    grey = np.asarray(d.image.convert("L"), dtype=np.float32) / 255.0
                    self.pools.setdefault((d.label, size), []).append(grey)
        self.per_digit = [len(self.pools[(d, 0)]) for d in range(10)]

    def draw_scans(self, scene: Scene, rng: random.Random) -> Picture:
        return Picture(scene, tuple(rng.randrange(self.per_digit[o.digit]) for o in scene))

    def vary(self, pic: Picture, scene: Scene, rng: random.Random) -> Picture:
        """``scene`` drawn with ``pic``'s scans where an object kept its digit (only the changed detail moves)."""
        old = {(o.cell, o.digit): s for o, s in zip(pic.scene, pic.scans)}
        by_digit = {o.digit: s for o, s in zip(pic.scene, pic.scans)}
        scans = []
        for o in scene:
            s = old.get((o.cell, o.digit), by_digit.get(o.digit))
            scans.append(rng.randrange(self.per_digit[o.digit]) if s is None else s)
        return Picture(scene, tuple(scans))

    def render(self, pic: Picture) -> Image.Image:
        canvas = np.zeros((CANVAS, CANVAS, 3), dtype=np.float32)
        for o, s in zip(pic.scene, pic.scans):
            grey = self.pools[(o.digit, o.size)][s]
            px = SIZE_PX[o.size]
            y = (o.cell // 2) * CELL + (CELL - px) // 2
            x = (o.cell % 2) * CELL + (CELL - px) // 2
            tint = grey[:, :, None] * np.asarray(COLOURS[COLOUR_NAMES[o.colour]], dtype=np.float32)
            canvas[y:y + px, x:x + px] = np.maximum(canvas[y:y + px, x:x + px], tint)
        return Image.fromarray(canvas.clip(0, 255).astype(np.uint8), mode="RGB")


def random_scene(rng: random.Random) -> Scene:
    n = rng.choice([1, 2, 2, 3, 3])  # mostly 2-3 digits: more details to confuse
    cells = rng.sample(range(len(CELLS)), n)
    return make_scene([Obj(c, rng.randrange(10), rng.randrange(len(COLOURS)), rng.randrange(len(SIZES)))
                       for c in cells])


# ------------------------------------------------------------------ records
# (task, candidate queries, target builder); the cell of the cell question is drawn per scene
TURNS: list[tuple[str, list[str], Callable[[Scene, int], str]]] = [
    ("ret", [I2T_QUESTION, "List every digit with its colour, size and place."], lambda s, c: caption(s)),
    ("cls", [COUNT_QUESTION, "Count the digits and name them in reading order."],
     lambda s, c: count_answer([o.digit for o in s])),
    ("vqa_local", [CELL_QUESTION, "Describe the {} cell."], cell_answer),
    ("vqa_local", ["Which colours appear?", "Name the colours of the digits."], lambda s, c: colours_answer(s)),
    ("vqa_global", ["Which cells are empty?", "Where is there no digit?"], lambda s, c: empty_answer(s)),
    ("vqa_creative", ["What do the digits add up to?", "Add up the digits."],
     lambda s, c: f"{sum(o.digit for o in s)}."),
]


def record(key: str, scene: Scene, rng: random.Random) -> dict:
    """The demo's record schema (docs/method.md §2.3); texts end with a newline as the demo's do."""
    occupied = [o.cell for o in scene]
    cell = rng.choice(occupied) if rng.random() < 0.8 else rng.randrange(len(CELLS))
    return {"key": key, "caption": caption(scene),
            "turns": [{"task": t, "queries": [q.format(CELLS[cell]) + "\n" for q in qs],
                       "target": fn(scene, cell) + "\n"} for t, qs, fn in TURNS]}


# ------------------------------------------------------------------ eval tasks
@dataclass
class EvalItem:
    """One held-out query: what the task row holds, plus the structured truth of every candidate (tests)."""

    task: str
    query: Picture
    question: str
    candidates: list  # texts (I2T, CLS) or Pictures (T2I); gold first
    truths: list  # Scene (I2T, T2I), Obj or digit tuple (CLS) per candidate


def eval_items(renderer: Renderer, rng: random.Random, n: int) -> list[EvalItem]:
    """``n`` queries per task, every query scene a different one."""
    items: list[EvalItem] = []
    used: set[str] = set()
    k = N_CANDIDATES - 1
    for task in TASKS:
        for i in range(n):
            while True:
                scene = random_scene(rng)
                if caption(scene) not in used:
                    break
            used.add(caption(scene))
            pic = renderer.draw_scans(scene, rng)
            if task in ("FG-I2T", "FG-T2I"):
                others = pick_balanced(scene_variants(scene, rng), k, rng)
                if task == "FG-I2T":
                    items.append(EvalItem(task, pic, I2T_QUESTION, [caption(s) for s in [scene, *others]],
                                          [scene, *others]))
                else:
                    cands = [pic, *(renderer.vary(pic, s, rng) for s in others)]
                    items.append(EvalItem(task, pic, caption(scene), cands, [scene, *others]))
            elif i % 2 == 0:  # a cell question
                obj = rng.choice(scene)
                others = pick_balanced(object_variants(obj), k, rng)
                items.append(EvalItem(task, pic, CELL_QUESTION.format(CELLS[obj.cell]),
                                      [object_phrase(o) + "." for o in [obj, *others]], [obj, *others]))
            else:  # the count-and-digits question
                digits = tuple(o.digit for o in scene)
                others = pick_balanced(sequence_variants(digits), k, rng)
                items.append(EvalItem(task, pic, COUNT_QUESTION, [count_answer(d) for d in [digits, *others]],
                                      [digits, *others]))
    return items


def eval_rows(items: Sequence[EvalItem], images: Path, image_dir: str, renderer: Renderer) -> dict[str, list[dict]]:
    """MMEB_Test_Instruct-shaped rows (gold candidate first); renders every picture into ``images``."""
    rows: dict[str, list[dict]] = {t: [] for t in TASKS}
    for n, it in enumerate(items):
        name = f"{it.task.lower().replace('-', '_')}_{n:04d}"
        if it.task == "FG-T2I":
            paths = []
            for j, p in enumerate(it.candidates):
                renderer.render(p).save(images / f"{name}_c{j}.png")
                paths.append(f"{image_dir}/{name}_c{j}.png")
            rows[it.task].append({"qry_inst": "Find an image that matches the given caption.",
                                  "qry_text": it.question, "qry_img_path": "",
                                  "tgt_inst": "Represent the given image.", "tgt_text": [""] * len(paths),
                                  "tgt_img_path": paths})
        else:
            renderer.render(it.query).save(images / f"{name}.png")
            rows[it.task].append({"qry_inst": f"<|image_1|> {it.question}", "qry_text": "",
                                  "qry_img_path": f"{image_dir}/{name}.png", "tgt_inst": "",
                                  "tgt_text": list(it.candidates), "tgt_img_path": [""] * len(it.candidates)})
    return rows


# ------------------------------------------------------------------ building
def renderers(seed: int = 0) -> tuple[Renderer, Renderer]:
    """Renderers over the demo's training and held-out scans (the demo's split for ``seed``)."""
    train_digits, held_digits = split(load_digits_images(8), seed=seed)
    return Renderer({d.key for d in train_digits}), Renderer({d.key for d in held_digits})


def scene_records(name: str, count: int, renderer: Renderer, rng: random.Random,
                  exclude: Container[str] = ()) -> list[tuple[dict, Picture]]:
    """``count`` records (with their ``image`` file name) and the pictures to render for them; no scene whose
    caption is in ``exclude``."""
    out = []
    for i in range(count):
        key = f"fg{name}{i:05d}"
        scene = random_scene(rng)
        while caption(scene) in exclude:
            scene = random_scene(rng)
        pic = renderer.draw_scans(scene, rng)
        out.append(({**record(key, scene, rng), "image": f"{key}.png"}, pic))
    return out


def finegrained_ready(root: str | Path) -> bool:
    root = Path(root)
    return all((root / p).exists() for p in ("train/manifest.json", "val/manifest.json", "eval/tasks.yaml"))


def rendered(records: Iterable[tuple[dict[str, Any], Picture]], renderer: Renderer,
             images: Path) -> Iterator[dict[str, Any]]:
    """The records, each after its scene's picture is saved under ``images``."""
    for rec, pic in records:
        renderer.render(pic).save(images / rec["image"])
        yield rec


def build_finegrained(root: str | Path = "data/finegrained", seed: int = 0, train_scenes: int = 3000,
                      val_scenes: int = 300, eval_queries: int = 200, samples_per_shard: int = 500) -> Path:
    """Write the benchmark under ``root`` (shards, eval tasks, images); a pure function of ``seed``."""
    root = Path(root)
    images = root / "images"
    images.mkdir(parents=True, exist_ok=True)
    train_r, held_r = renderers(seed)
    # the eval scenes come first, and the training scenes avoid every scene they name (queries and distractors):
    # a distractor the model saw in training (say the one-digit variant: there are only 320 one-digit scenes,
    # most of them among 3,000 training scenes) would beat an unseen truth for having been seen, not for its details
    items = eval_items(held_r, random.Random(seed + 1), eval_queries)
    eval_caps = {caption(s) for it in items for s in [it.query.scene, *(it.truths if it.task != "FG-CLS" else [])]}
    rng = random.Random(seed)
    for name, count, renderer in (("train", train_scenes, train_r), ("val", val_scenes, held_r)):
        write_split(root, name, rendered(scene_records(name, count, renderer, rng, eval_caps), renderer, images),
                    samples_per_shard, "finegrained", turns=len(TURNS))
    write_tasks(root, eval_rows(items, images, "images", held_r), EVAL_META, EVAL_CANDIDATES,
                "held-out fine-grained digit scenes in MMEB_Test_Instruct format (written by muco.demo.finegrained)")
    return root
