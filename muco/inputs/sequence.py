"""Model inputs from templated texts: tokenisation, the image placeholder expanded to its visual tokens,
right-padding. Used by every collator (training, mining) and by the encoder at inference.

Tokenisation runs on the texts with a single ``<|image_pad|>``; the pad is expanded to the image's visual-token
count on the id lists afterwards, which is far cheaper than tokenising hundreds of placeholder strings.
Batches are right-padded and never truncated: truncation would lose ``<|emb|>`` slots.

Images leave as uint8 patches (``muco.inputs.image_policy.patchify``); the model side (``Embedder``) normalises
them on the device into the stock float format.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from typing import Any

import torch
from PIL import Image
from transformers import PreTrainedTokenizerBase

from muco.inputs.image_policy import MERGE, ImagePolicy, patchify
from muco.inputs.templates import IMAGE_PAD, find_reserved
from muco.inputs.tokenizer import SpecialTokenIds


def text_id(text: str) -> int:
    """A stable 63-bit id of a text (equal texts, equal ids, in every process), for same-text masking."""
    return int.from_bytes(hashlib.blake2b(text.encode("utf-8"), digest_size=8).digest(), "little") >> 1


class BadSampleError(ValueError):
    """A sample that cannot be turned into a sequence; the message names the sample."""


def check_user_text(text: str, key: str, field: str) -> None:
    """Refuse data texts that hold a special-token string (it would misalign pooling)."""
    bad = find_reserved(text)
    if bad is not None:
        raise BadSampleError(f"sample {key!r}: {field} contains the reserved string {bad!r}")


class SequenceEncoder:
    """Encodes fully templated texts, each with zero or one image, into one padded batch."""

    def __init__(self, tokenizer: PreTrainedTokenizerBase, image_policy: ImagePolicy) -> None:
        self.tokenizer = tokenizer
        self.policy = image_policy
        self.ids = SpecialTokenIds.from_tokenizer(tokenizer)
        self.merge = MERGE

    def __call__(self, texts: Sequence[str], images: Sequence[Image.Image | None]) -> dict[str, torch.Tensor]:
        if len(texts) != len(images):
            raise ValueError(f"{len(texts)} texts but {len(images)} images")
        present = [im for im in images if im is not None]
        out: dict[str, Any] = {}
        visual_tokens: list[int] = []
        if present:
            # prepare keeps images the stream already brought to the final size: one resize in all
            pixel_values, grid = patchify([self.policy.prepare(im) for im in present])
            out["pixel_values"] = pixel_values  # uint8 [patches, 3*14*14]
            out["image_grid_thw"] = grid
            visual_tokens = (grid.prod(-1) // self.merge**2).tolist()

        encoded = self.tokenizer(list(texts), add_special_tokens=False)["input_ids"]
        pad_id, img_id = self.ids.pad, self.ids.image_pad
        rows: list[list[int]] = []
        it = iter(visual_tokens)
        for text_ids, image in zip(encoded, images):
            n_pad = text_ids.count(img_id)
            if n_pad != (1 if image is not None else 0):
                raise ValueError(
                    f"a sequence has {n_pad} {IMAGE_PAD} placeholders but {'one image' if image else 'no image'}"
                )
            if image is not None:
                at = text_ids.index(img_id)
                text_ids = text_ids[:at] + [img_id] * next(it) + text_ids[at + 1 :]
            rows.append(text_ids)

        width = max(len(r) for r in rows)
        input_ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
        attention_mask = torch.zeros((len(rows), width), dtype=torch.long)
        for i, r in enumerate(rows):
            input_ids[i, : len(r)] = torch.tensor(r, dtype=torch.long)
            attention_mask[i, : len(r)] = 1
        out["input_ids"] = input_ids
        out["attention_mask"] = attention_mask
        out["mm_token_type_ids"] = (input_ids == img_id).int()
        return out
