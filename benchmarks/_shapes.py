"""Shapes for the turn benchmark: M3T-like photos and turns, and an analytic FLOP model of Qwen2-VL.

* ``photos`` cuts scikit-image's bundled real photos to the pretraining resolution (short side 640 by default);
  their aspect ratios (1:1 to 3:2) give 529-782 visual tokens each, around M3T's 640x853 -> 690.
* ``m3t_record`` synthesises one deterministic M3T-like record (7 turns in the released order: cls, vqa_global
  x2, vqa_local x2, vqa_creative, ret) with English queries of 15-25 words, short answers, and a dense caption of
  80-120 words as the ``ret`` target.
* ``Arch`` + ``step_flops`` count the matmul FLOPs of vision tower (patch embedding, blocks, per-image full
  attention), merger and language model (projections, MLP, LoRA, causal attention) over actual token counts.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING

import numpy as np
from PIL import Image

if TYPE_CHECKING:
    from transformers import Qwen2VLConfig

# ------------------------------------------------------------------------------------------------ photos
PHOTOS = ("astronaut", "chelsea", "coffee", "rocket", "stereo_motorcycle", "hubble_deep_field", "camera", "coins")


def photos(short_side: int = 640) -> list[tuple[str, Image.Image]]:
    """scikit-image's bundled photos as RGB, resized (LANCZOS) so that the short side is ``short_side``."""
    from skimage import data

    out = []
    for name in PHOTOS:
        arr = getattr(data, name)()
        arr = np.asarray(arr[0] if isinstance(arr, tuple) else arr)
        im = Image.fromarray(arr).convert("RGB")
        scale = short_side / min(im.size)
        im = im.resize((max(1, round(im.width * scale)), max(1, round(im.height * scale))), Image.Resampling.LANCZOS)
        out.append((name, im))
    return out


# ------------------------------------------------------------------------------------------------ texts
_OBJ = ("ceramic mug", "wooden table", "spacesuit helmet", "tabby cat", "launch tower", "motorcycle fairing",
        "saucer", "window frame", "metal railing", "leather seat", "striped tail", "exhaust pipe", "flag patch",
        "coin edge", "camera tripod", "spiral galaxy", "coffee foam", "rear wheel", "visor reflection",
        "concrete platform", "fuel tank", "brass handle", "checkered floor", "woven basket")
_ADJ = ("weathered", "glossy", "matte", "slightly tilted", "partially shaded", "brightly lit", "rounded",
        "narrow", "cluttered", "symmetrical", "faded", "polished", "textured", "translucent", "dented")
_COLOR = ("white", "deep red", "pale blue", "charcoal grey", "amber", "olive green", "cream", "silver",
          "dark brown", "orange", "black", "golden")
_PLACE = ("in the lower left corner", "along the right edge", "near the centre", "in the upper half",
          "behind the main subject", "in the foreground", "at the far end", "just above the horizon",
          "beside the largest object", "toward the top right")
_REL = ("resting on", "leaning against", "partly covering", "reflected in", "positioned beside",
        "casting a shadow over", "framed by", "overlapping", "mounted above", "facing")
_MAT = ("stainless steel", "glazed porcelain", "brushed aluminium", "rough fabric", "painted wood",
        "tempered glass", "soft fur", "worn rubber")
_CLS = ("Espresso cup.", "Domestic cat.", "Astronaut portrait.", "Sport motorcycle.", "Launch vehicle.",
        "Spiral galaxy.", "Coin collection.", "Film camera.", "Latte art.", "Space shuttle.")

# Full query templates per task (question- and statement-style), lengthened with context clauses to 15-25 words.
_Q_TASK = {
    "cls": ("Which category best describes the {a} {o} {p}", "Name the general class of the {a} subject {p}",
            "What kind of object is the {c} {o} {r} the {o2}"),
    "vqa_global": ("What overall mood do the {c} tones and the {a} {o} {p} convey",
                   "Describe the setting suggested by the arrangement of the {o} and the {o2}",
                   "What kind of environment does the {a} lighting across the whole scene imply"),
    "vqa_local": ("What material forms the {a} {o} {r} the {c} {o2}", "State the colour of the small {o} {p}",
                  "How would you characterise the shape of the {a} detail {r} the {o}"),
    "vqa_creative": ("What purpose might the {c} {o} have served before it was placed {p}",
                     "Suggest a story that explains why the {a} {o} is {r} the {o2}",
                     "What would someone standing {p} most likely notice first about the {o}"),
    "ret": ("Find a scene in which a {a} {o} sits {p} while a {c} {o2} appears nearby",
            "Retrieve the view showing the {c} {o} {r} a {a} {o2} {p}",
            "Look for an arrangement with the {o} {p} and {m} surfaces around it"),
}
_Q_TAIL = ("given the surrounding context", "considering the visible details", "based on the lighting",
           "taking the background into account", "judging from the textures and colours",
           "relative to the other elements", "as seen from this viewpoint", "ignoring the smaller objects")
_A_PIECE = ("made of {m}", "{r} the {o2}", "{p}", "with {c} edges", "and slightly worn", "under soft light")


def _fill(rng: random.Random, template: str) -> str:
    return template.format(a=rng.choice(_ADJ), o=rng.choice(_OBJ), o2=rng.choice(_OBJ), c=rng.choice(_COLOR),
                           p=rng.choice(_PLACE), r=rng.choice(_REL), m=rng.choice(_MAT))


def _n(text: str) -> int:
    return len(text.split())


def _query(rng: random.Random, task: str, lo: int = 15, hi: int = 25) -> str:
    """A question- or statement-style query of ``lo``..``hi`` words (whole clauses, never cut)."""
    want = rng.randint(lo, hi)
    body = _fill(rng, rng.choice(_Q_TASK[task]))
    tails = rng.sample(_Q_TAIL, len(_Q_TAIL))
    while _n(body) < want and tails:
        tail = tails.pop()
        if _n(body) + _n(tail) > hi:
            continue
        body += ", " + tail
    first = body.split()[0]
    return body + ("?" if first in ("Which", "What", "How", "Where") else ".")


def _answer(rng: random.Random, lo: int, hi: int) -> str:
    """A short answer of about ``lo``..``hi`` words built from whole phrases."""
    want = rng.randint(lo, hi)
    words = f"{rng.choice(_COLOR).capitalize()} {rng.choice(_OBJ)}" if want > 2 else rng.choice(_OBJ).capitalize()
    pieces = list(_A_PIECE)
    rng.shuffle(pieces)
    for piece in pieces:
        piece = _fill(rng, piece)
        if _n(words) >= want:
            break
        if _n(words) + _n(piece) <= hi:
            words += " " + piece
    return words + "."


def _caption(rng: random.Random, lo: int = 80, hi: int = 120) -> str:
    """A dense caption of ``lo``..``hi`` words: objects, attributes, spatial relations, whole sentences."""
    want = rng.randint(lo, hi)
    patterns = (
        "A {a} {c} {o} sits {p}, {r} a {a2} {o2}.",
        "The {o} is made of {m} and shows a {a} surface with {c} highlights.",
        "{P}, a {c} {o} is {r} the {o2}, which looks {a}.",
        "Light falls from the left, leaving the {o} {a} and the {o2} in {c} shadow.",
        "Behind it, a {a} {o} with {m} details stretches {p}.",
        "Small {c} marks cover the {o}, suggesting long use.",
    )
    sentences: list[str] = []
    for _ in range(100):  # whole sentences until the drawn length; stop once none fits under `hi`
        if sum(map(_n, sentences)) >= want:
            break
        s = rng.choice(patterns).format(
            a=rng.choice(_ADJ), a2=rng.choice(_ADJ), c=rng.choice(_COLOR), o=rng.choice(_OBJ), o2=rng.choice(_OBJ),
            p=rng.choice(_PLACE), P=rng.choice(_PLACE).capitalize(), r=rng.choice(_REL), m=rng.choice(_MAT))
        if sum(map(_n, sentences)) + _n(s) <= hi:
            sentences.append(s)
    return " ".join(sentences)


# (task, answer length in words); the `ret` target is the caption itself
TURN_TASKS = (("cls", (1, 3)), ("vqa_global", (4, 12)), ("vqa_global", (4, 12)), ("vqa_local", (3, 10)),
              ("vqa_local", (3, 10)), ("vqa_creative", (8, 16)), ("ret", None))


def m3t_record(seed: int, candidates: int = 2) -> dict:
    """One M3T-like record (docs/method.md §2.3 layout): 7 turns in the released order plus the dense caption."""
    rng = random.Random(seed)
    caption = _caption(rng)
    turns = []
    for task, span in TURN_TASKS:
        queries = [_query(rng, task) for _ in range(candidates)]
        if task == "cls":
            target = rng.choice(_CLS) if rng.random() < 0.7 else _answer(rng, *span)
        else:
            target = caption if span is None else _answer(rng, *span)
        turns.append({"task": task, "queries": queries, "target": target})
    return {"turns": turns, "caption": caption}


# ------------------------------------------------------------------------------------------------ FLOPs
@dataclass(frozen=True)
class Arch:
    """The matmul-relevant dims of a Qwen2-VL backbone (+ LoRA rank on the 7 LLM linears, 0 = none)."""

    v_dim: int
    v_depth: int
    v_mlp: int  # vision MLP hidden width
    hidden: int
    inter: int
    layers: int
    heads: int
    kv_heads: int
    lora_r: int = 0
    patch_in: int = 3 * 2 * 14 * 14  # channels x temporal patch x patch^2
    merge: int = 2

    @property
    def kv_dim(self) -> int:
        return self.kv_heads * (self.hidden // self.heads)

    @classmethod
    def from_config(cls, cfg: Qwen2VLConfig, lora_r: int = 0) -> Arch:
        """From a ``Qwen2VLConfig``."""
        v, t = cfg.vision_config, cfg.text_config
        return cls(v_dim=v.embed_dim, v_depth=v.depth, v_mlp=int(v.embed_dim * v.mlp_ratio), hidden=t.hidden_size,
                   inter=t.intermediate_size, layers=t.num_hidden_layers, heads=t.num_attention_heads,
                   kv_heads=t.num_key_value_heads, lora_r=lora_r)

    @classmethod
    def from_preset(cls, p: dict, lora_r: int = 0) -> Arch:
        """From an entry of ``muco.model.backbone.PRESETS``."""
        v, t = p["vision"], p["text"]
        return cls(v_dim=v["embed_dim"], v_depth=v["depth"], v_mlp=int(v["embed_dim"] * v["mlp_ratio"]),
                   hidden=t["hidden_size"], inter=t["intermediate_size"], layers=t["num_hidden_layers"],
                   heads=t["num_attention_heads"], kv_heads=t["num_key_value_heads"], lora_r=lora_r)

    def with_lora(self, r: int) -> Arch:
        return replace(self, lora_r=r)

    def lm_linear_per_token(self) -> tuple[float, float]:
        """(base, LoRA) forward FLOPs of one token through all decoder layers' linears."""
        h, i, kv = self.hidden, self.inter, self.kv_dim
        shapes = ((h, h), (h, kv), (h, kv), (h, h), (h, i), (h, i), (i, h))  # q k v o gate up down
        base = sum(2 * a * b for a, b in shapes) * self.layers
        lora = sum(2 * self.lora_r * (a + b) for a, b in shapes) * self.layers
        return float(base), float(lora)


@dataclass(frozen=True)
class StepShape:
    """What one training step runs: patches per image, and the token lengths of query and target sequences."""

    patches: tuple[int, ...]
    query_len: tuple[int, ...]
    target_len: tuple[int, ...]
    query_width: int  # padded width of the query batch
    target_width: int

    @classmethod
    def from_batch(cls, batch: dict) -> StepShape:
        q, t = batch["query"], batch["target"]
        grid = q.get("image_grid_thw")
        patches = () if grid is None else tuple(int(x) for x in grid.prod(-1))
        return cls(patches, tuple(int(x) for x in q["attention_mask"].sum(1)),
                   tuple(int(x) for x in t["attention_mask"].sum(1)), int(q["input_ids"].shape[1]),
                   int(t["input_ids"].shape[1]))

    def canonical(self, patches: int) -> StepShape:
        """The same texts with every image replaced by one of ``patches`` patches (e.g. 2760 = 640x853)."""
        merged = [p // 4 for p in self.patches]
        qlen = tuple(n - m + patches // 4 for n, m in zip(self.query_len, merged))
        return StepShape((patches,) * len(self.patches), qlen, self.target_len, max(qlen), self.target_width)


COMPONENTS = ("vision_linear", "vision_attn", "merger", "lm_linear", "lm_lora", "lm_attn")


def forward_flops(a: Arch, s: StepShape, executed: bool = False) -> dict[str, float]:
    """Forward matmul FLOPs per component.

    Ideal (``executed=False``): unpadded lengths, causal attention counted over the S(S+1)/2 causal pairs.
    Executed: every sequence at the padded width, attention over the full square (what SDPA computes on CPU
    when it gets an explicit padding mask), which is what the benchmark's CPU actually multiplies.
    """
    d, m = a.v_dim, a.merge**2
    vlin = vattn = merger = 0.0
    for p in s.patches:
        vlin += 2 * p * a.patch_in * d + a.v_depth * 2 * p * (4 * d * d + 2 * d * a.v_mlp)
        vattn += a.v_depth * 4 * p * p * d  # QK^T + AV, full attention within the image
        merger += 2 * (p // m) * (m * d * m * d + m * d * a.hidden)
    base, lora = a.lm_linear_per_token()
    lens = list(s.query_len) + list(s.target_len)
    if executed:
        lens = [s.query_width] * len(s.query_len) + [s.target_width] * len(s.target_len)
        pairs = sum(n * n for n in lens)
    else:
        pairs = sum(n * (n + 1) // 2 for n in lens)
    tokens = sum(lens)
    return {"vision_linear": vlin, "vision_attn": vattn, "merger": merger, "lm_linear": base * tokens,
            "lm_lora": lora * tokens, "lm_attn": float(a.layers * 4 * a.hidden * pairs)}


# Multipliers fwd+bwd per component. "paper": every matmul x3 (the usual 6ND convention, Tab. 5's count).
# "trained": what this model needs: vision tower and merger frozen (forward only, no backward), frozen LLM base
# weights (forward + input gradient, no weight gradient = x2), LoRA (x3), attention (forward + 2 backward matmuls).
MULTIPLIERS = {
    "paper": dict.fromkeys(COMPONENTS, 3.0),
    "trained": {"vision_linear": 1.0, "vision_attn": 1.0, "merger": 1.0, "lm_linear": 2.0, "lm_lora": 3.0,
                "lm_attn": 3.0},
}


def step_flops(a: Arch, s: StepShape, mode: str = "paper", executed: bool = False, grad_ckpt: bool = False) -> float:
    """FLOPs of one training step (forward + backward) under a multiplier convention of :data:`MULTIPLIERS`."""
    f = forward_flops(a, s, executed)
    mult = dict(MULTIPLIERS[mode])
    if grad_ckpt:  # the LLM forward runs twice (non-reentrant checkpointing recomputes each layer)
        for k in ("lm_linear", "lm_lora", "lm_attn"):
            mult[k] += 1.0
    return sum(f[k] * mult[k] for k in COMPONENTS)


def split(a: Arch, shapes: Sequence[StepShape]) -> dict[str, float]:
    """Forward-FLOP total and shares (ideal count) over some steps: vision (blocks + merger) and LLM of the
    total, vision attention of the vision blocks, merger of the total, LLM attention of the LLM."""
    f = dict.fromkeys(COMPONENTS, 0.0)
    for s in shapes:
        for k, v in forward_flops(a, s).items():
            f[k] += v
    total = sum(f.values())
    vision = f["vision_linear"] + f["vision_attn"] + f["merger"]
    llm = f["lm_linear"] + f["lm_lora"] + f["lm_attn"]
    return {"total": total, "vision": vision / total, "v_attn/v": f["vision_attn"] / (vision - f["merger"]),
            "merger": f["merger"] / total, "llm": llm / total, "l_attn/l": f["lm_attn"] / llm}
