"""Chat templates of the MuCo method (docs/method.md §4), reproduced character for character.

Every template is a pure function of strings. Images are referenced by the placeholder ``IMG``; the collator
expands its ``<|image_pad|>`` to the number of visual tokens of the image.
"""

from __future__ import annotations

from collections.abc import Sequence

EMB_TOKEN = "<|emb|>"
MASK_TOKEN = "<|mask|>"
IMAGE_PAD = "<|image_pad|>"
VISION_START = "<|vision_start|>"
VISION_END = "<|vision_end|>"
IMG = VISION_START + IMAGE_PAD + VISION_END

SYS = "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
PI1 = "Please rewrite your last response in human-readable language."
PI2 = (
    "Generate a response that first reconstructs your very last response by inferring any masked information, "
    "then acknowledges or rephrases the complete what I asked you, and finally integrates the Answer "
    "information seamlessly."
)

# Texts that would break pooling (extra <|emb|>) or masking if they came from data.
RESERVED_STRINGS = (EMB_TOKEN, MASK_TOKEN, IMAGE_PAD, VISION_START, VISION_END, "<|im_start|>", "<|im_end|>")


def turn(user: str) -> str:
    """One user turn answered by a single ``<|emb|>`` assistant turn."""
    return "<|im_start|>user\n" + user + "<|im_end|>\n<|im_start|>assistant\n" + EMB_TOKEN + "<|im_end|>"


def base_template(user: str) -> str:
    """Single-turn template: inference, evaluation and hard negatives (one ``<|emb|>``)."""
    return SYS + turn(user)


def pretrain_template(turns: Sequence[str]) -> str:
    """K-turn pretraining template (one ``<|emb|>`` per turn)."""
    if not turns:
        raise ValueError("pretrain_template needs at least one turn")
    return SYS + "\n".join(turn(t) for t in turns)


def finetune_template(user: str, masked_counterpart: str) -> str:
    """3-turn guided-reconstruction template (two ``<|emb|>``).

    There is deliberately no ``<|im_end|>`` after PI1: the released checkpoints were trained this way.
    """
    return (
        SYS
        + turn(user)
        + "\n<|im_start|>user\n"
        + PI1
        + "\n<|im_start|>assistant\n"
        + masked_counterpart
        + "<|im_end|>\n<|im_start|>user\n"
        + PI2
        + "<|im_end|>\n<|im_start|>assistant\n"
        + EMB_TOKEN
        + "<|im_end|>"
    )


def pretrain_query_turns(queries: Sequence[str], has_image: bool) -> list[str]:
    """User texts of the pretraining query sequence: the image goes in front of turn 1 only."""
    turns = list(queries)
    if has_image and turns:
        turns[0] = IMG + "\n" + turns[0]
    return turns


def single_turn_user_text(text: str, has_image: bool) -> str:
    """User text of the fine-tuning / evaluation form: ``IMG\\n`` + text, always ending in ``\\n``."""
    body = text if text.endswith("\n") else text + "\n"
    return IMG + "\n" + body if has_image else body


def find_reserved(text: str) -> str | None:
    """The first reserved special-token string inside ``text``, or None."""
    for s in RESERVED_STRINGS:
        if s in text:
            return s
    return None
