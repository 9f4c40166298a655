"""The masked counterpart of fine-tuning's guided reconstruction turn (docs/method.md §8.2)."""

from __future__ import annotations

import random
from dataclasses import dataclass

from muco.inputs.templates import MASK_TOKEN


@dataclass(frozen=True)
class MaskingConfig:
    """Word masking at `ratio`; with `full_mask_prob` the whole counterpart becomes one `<|mask|>`.

    `full_mask_prob=0.5` and `collapse_runs=True` are released-code details; the paper describes only uniform
    word masking (set `full_mask_prob=0`, `collapse_runs=False` for that).
    """

    ratio: float = 0.5
    full_mask_prob: float = 0.5
    collapse_runs: bool = True

    def __post_init__(self) -> None:
        if not (0.0 <= self.ratio <= 1.0 and 0.0 <= self.full_mask_prob <= 1.0):
            raise ValueError(f"masking ratio and full_mask_prob must lie in [0, 1], got {self}")


def counterpart_text(text: str, caption: str | None, has_image: bool) -> str:
    """The counterpart's user text with its image replaced by ``Image description: {caption}``."""
    body = text if text.endswith("\n") else text + "\n"
    if not has_image:
        return body
    if not caption:
        raise ValueError("an image-bearing counterpart needs a caption for its masked form")
    return f"Image description: {caption}\n" + body


def mask_words(text: str, rng: random.Random, cfg: MaskingConfig = MaskingConfig()) -> str:
    """Mask a counterpart: the full-mask coin first, then one coin per space-separated word."""
    if rng.random() < cfg.full_mask_prob:
        return MASK_TOKEN
    out: list[str] = []
    for word in text.split(" "):
        if rng.random() < cfg.ratio:
            if cfg.collapse_runs and out and out[-1] == MASK_TOKEN:
                continue
            out.append(MASK_TOKEN)
        else:
            out.append(word)
    return " ".join(out)
