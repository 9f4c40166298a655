"""MMEB string rules (docs/method.md §12): query text, candidate texts and names, and the encoding normalisation.

Everything here is a pure function of the MMEB_Test_Instruct columns, so the exact strings can be unit-tested.
Texts are built in MMEB notation first (placeholder ``<|image_pad|>``) and only turned into the user text
``u`` of ``BASE(u)`` by :func:`to_user_text`.

Two details follow the released harness where docs/method.md is silent:

- ``<|image_1|>`` inside an instruction is removed before the rule puts its own placeholder in front; keeping
  it would give two placeholders for one image.
- image candidates also get the ``" \\n" -> "\\n"`` fix and a trailing ``"\\n"``, as the query does.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from muco.inputs.templates import EMB_TOKEN, IMAGE_PAD, IMG, MASK_TOKEN

IMAGE_1 = "<|image_1|>"  # Phi-3-V style marker used in MMEB data

# text: cls / qa / i2t (raw tgt_text, no image); image: t2i (named by image path);
# image_caption: i2i retrieval and grounding (named `path:caption`, several crops/captions share one image)
CANDIDATE_MODES = ("text", "image", "image_caption")

# strings that would corrupt pooling or the chat structure if they came from data
_FORBIDDEN = (EMB_TOKEN, MASK_TOKEN, "<|im_start|>", "<|im_end|>")
_PLACEHOLDER_RE = re.compile(re.escape(IMAGE_1) + "|" + re.escape(IMAGE_PAD))


@dataclass(frozen=True)
class MMEBQuery:
    """One row of an MMEB_Test_Instruct test split; the gold candidate comes first."""

    qry_inst: str
    qry_text: str
    qry_img_path: str
    tgt_inst: str
    tgt_text: tuple[str, ...] = field(default_factory=tuple)
    tgt_img_path: tuple[str, ...] = field(default_factory=tuple)

    @property
    def has_image(self) -> bool:
        return bool(self.qry_img_path)


@dataclass(frozen=True)
class Candidate:
    """One entry of a query's candidate list: de-duplication name, MMEB text, image path (or None)."""

    name: str
    text: str
    image_path: str | None


def query_text(q: MMEBQuery) -> str:
    """``"<|image_pad|> " + qry_inst`` (+ ``" " + qry_text``), ``" \\n"`` -> ``"\\n"``, trailing ``"\\n"``.

    The placeholder (and its space) is left out when the query has no image (t2i).
    """
    inst = q.qry_inst.replace(IMAGE_1, "")
    text = (IMAGE_PAD + " " if q.has_image else "") + inst
    if q.qry_text:
        text += " " + q.qry_text
    return text.replace(" \n", "\n") + "\n"


def image_candidate_text(tgt_inst: str, caption: str) -> str:
    """``"<|image_pad|> " + tgt_inst`` (+ ``" " + caption`` when it is not blank), same fixes as the query."""
    text = IMAGE_PAD + " " + tgt_inst.replace(IMAGE_1, "")
    if caption.strip():
        text += " " + caption
    return text.replace(" \n", "\n") + "\n"


def candidates(q: MMEBQuery, mode: str) -> list[Candidate]:
    """The query's own candidate list, gold first, with names for de-duplication."""
    if mode == "text":
        return [Candidate(name=t, text=t, image_path=None) for t in q.tgt_text]
    if mode not in CANDIDATE_MODES:
        raise ValueError(f"unknown candidate mode {mode!r}; choose one of {CANDIDATE_MODES}")
    paths = q.tgt_img_path
    # t2i rows may carry no captions at all; i2i/grounding rows one per image (often empty)
    captions = q.tgt_text if q.tgt_text else ("",) * len(paths)
    if len(captions) != len(paths):
        raise ValueError(f"{len(paths)} candidate images but {len(captions)} candidate texts")
    out = []
    for path, cap in zip(paths, captions):
        if not path:
            raise ValueError(f"candidate mode {mode!r} needs an image for every candidate")
        name = path if mode == "image" else path + ":" + cap.strip('"')
        out.append(Candidate(name=name, text=image_candidate_text(q.tgt_inst, cap), image_path=path))
    return out


def to_user_text(text: str) -> str:
    """Encoding step: trailing ``"\\n"``, repeated newlines collapsed, placeholders mapped to ``IMG``.

    The result is the ``u`` of ``BASE(u)``.
    """
    for bad in _FORBIDDEN:
        if bad in text:
            raise ValueError(f"MMEB text contains the reserved string {bad!r}: {text[:80]!r}")
    if not text.endswith("\n"):
        text += "\n"
    text = re.sub(r"\n+", "\n", text)
    # one pass, so the IMAGE_PAD inside IMG is not replaced again
    return _PLACEHOLDER_RE.sub(IMG, text)
