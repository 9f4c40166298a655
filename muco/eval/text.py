"""MMEB string rules (docs/method.md §12, docs/evaluation.md §3): query texts, candidate texts and names, encoding.

The released MuCo evaluation builds these strings with one parser per task type (``image_cls``, ``image_qa``,
``image_i2t``, ``image_t2i``, ``image_i2i_vg``), and the parsers differ in small ways that change the encoded
text: where the instruction's newline goes, whether ``" \\n"`` becomes ``"\\n"``, whether a row's candidates carry
captions. This module re-implements each parser's rules so that the user text ``u`` of ``BASE(u)`` is the one
the released evaluation encodes, byte for byte, with the exceptions listed in docs/evaluation.md §3 (rules 8-11):
where the released code has a plain bug (``<|image_1|>`` wrapped twice at encoding) this module does what it
means; where it would crash (a row without captions or without a query image) it does the obvious thing; and a
text-only item loses its placeholders before the last newline collapse, not after it.

Everything here is a pure function of the row, so each rule is unit-tested with explicit strings. Texts are
built in MMEB notation first (image placeholder ``<|image_pad|>``) and only turned into ``u`` by
:func:`to_user_text`.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from muco.inputs.templates import EMB_TOKEN, IMAGE_PAD, IMG, MASK_TOKEN

IMAGE_1 = "<|image_1|>"  # Phi-3-V style marker used in MMEB data

# The two layouts of MMEB test splits in circulation (muco.eval.data detects them per file):
# MMEB_Test_Instruct (ziyjiang/MMEB_Test_Instruct, what the released MuCo / VLM2Vec-v2 evaluation reads) keeps the
# instruction apart (qry_inst, tgt_inst); MMEB-eval (TIGER-Lab/MMEB-eval, VLM2Vec v1) joins it into qry_text and
# into each tgt_text entry.
INSTRUCT = "MMEB_Test_Instruct"
MMEB_EVAL = "MMEB-eval"
LAYOUTS = (INSTRUCT, MMEB_EVAL)

# The released parsers (src/data/eval_dataset/ of naver-ai/muco) and the candidates each one builds:
# text           raw tgt_text strings, no image, named by the text (cls / qa / i2t)
# image          "<|image_pad|> " + tgt_inst (+ caption) with the candidate image, named by its path (t2i)
# image_caption  as `image`, named `path:caption` since several crops or captions share one image (i2i / VG)
PARSER_CANDIDATES = {
    "image_cls": "text",
    "image_qa": "text",
    "image_i2t": "text",
    "image_t2i": "image",
    "image_i2i_vg": "image_caption",
}
PARSERS = tuple(PARSER_CANDIDATES)
CANDIDATE_MODES = ("text", "image", "image_caption")
# a query built by hand without a parser: its candidates' rules follow the task's candidate mode
_MODE_PARSER = {"text": "image_cls", "image": "image_t2i", "image_caption": "image_i2i_vg"}

# strings that would corrupt pooling or the chat structure if they came from data
_FORBIDDEN = (EMB_TOKEN, MASK_TOKEN, "<|im_start|>", "<|im_end|>")
# IMG first, so a text that already holds IMG keeps it as is (to_user_text is idempotent on its own output)
_PLACEHOLDER_RE = re.compile("|".join(re.escape(p) for p in (IMG, IMAGE_1, IMAGE_PAD)))


@dataclass(frozen=True)
class MMEBQuery:
    """One row of an MMEB test split; the gold candidate comes first.

    The fields are those of the MMEB_Test_Instruct layout. A row of the MMEB-eval layout (``layout="MMEB-eval"``)
    has its instruction inside ``qry_text`` and inside each ``tgt_text`` entry: it is held with ``qry_inst`` = the
    file's ``qry_text`` (instruction and text), ``qry_text = ""``, ``tgt_inst = ""`` and ``tgt_text`` = the file's
    entries, so the parsers treat the joined string as the instruction.

    ``parser`` names the rules the row's texts follow (one of :data:`PARSERS`); a task sets it from its spec.
    ``None`` (a query built by hand) applies ``image_cls`` rules with a query image and ``image_t2i`` rules
    without. The ``image_t2i`` parser never reads ``qry_img_path`` (its queries are text only), so it is cleared.
    """

    qry_inst: str
    qry_text: str
    qry_img_path: str
    tgt_inst: str
    tgt_text: tuple[str, ...] = field(default_factory=tuple)
    tgt_img_path: tuple[str, ...] = field(default_factory=tuple)
    parser: str | None = None
    layout: str = INSTRUCT

    def __post_init__(self) -> None:
        if self.parser is not None and self.parser not in PARSER_CANDIDATES:
            raise ValueError(f"unknown MMEB parser {self.parser!r}; choose one of {PARSERS}")
        if self.layout not in LAYOUTS:
            raise ValueError(f"unknown MMEB layout {self.layout!r}; choose one of {LAYOUTS}")
        if self.parser == "image_t2i" and self.qry_img_path:
            object.__setattr__(self, "qry_img_path", "")

    @property
    def has_image(self) -> bool:
        return bool(self.qry_img_path)

    @property
    def query_parser(self) -> str:
        """The parser whose query rule applies (``parser``, or the fallback for a hand-built query)."""
        if self.parser is not None:
            return self.parser
        return "image_cls" if self.has_image else "image_t2i"


@dataclass(frozen=True)
class Candidate:
    """One entry of a query's candidate list: de-duplication name, MMEB text, image path (or None)."""

    name: str
    text: str
    image_path: str | None


def _fix(text: str) -> str:
    """The released parsers' ``" \\n"`` -> ``"\\n"`` (a space left before the instruction's own newline)."""
    return text.replace(" \n", "\n")


def image_query_text(inst: str, text: str = "", *, strip_instruction: bool = False) -> str:
    """Query text of the image-query parsers, before the encoding step (MMEB notation).

    ``"<|image_pad|> " + inst`` (``<|image_1|>`` removed), then ``" " + text`` when ``text`` is not empty,
    ``" \\n"`` -> ``"\\n"``, and a trailing ``"\\n"``. With ``strip_instruction`` (``image_qa`` and
    ``image_i2i_vg``) the instruction is stripped and put on a new line: ``"\\n" + inst.strip()``; ``image_cls``
    and ``image_i2t`` keep it as it is.
    """
    inst = inst.replace(IMAGE_1, "")
    if strip_instruction:
        inst = "\n" + inst.strip()
    body = IMAGE_PAD + " " + inst
    if text:  # the released helper tests the text's truth: a blank but non-empty text is still appended
        body += " " + text
    return _fix(body) + "\n"


def t2i_query_text(inst: str, text: str, *, joined: bool = False) -> str:
    """Query text of ``image_t2i`` (MMEB notation): ``inst + " " + text + "\\n"``, ``<|image_1|>`` -> ``<|image_pad|>``.

    No ``" \\n"`` fix, and the text is appended even when empty (a trailing ``" \\n"`` stays). ``joined``: the
    MMEB-eval layout, whose ``qry_text`` already is instruction and text, so nothing is appended but the newline.
    The query has no image, so the encoding step drops any placeholder (:func:`text_only`).
    """
    inst = inst.replace(IMAGE_1, IMAGE_PAD)
    return (inst if joined else inst + " " + text) + "\n"


def image_candidate_texts(tgt_inst: str, captions: tuple[str, ...], n: int, *, end_newline: bool) -> list[str]:
    """The ``n`` image-candidate texts of one row of ``image_t2i`` / ``image_i2i_vg`` (MMEB notation).

    Whether the row has captions is decided from its **first** caption, as the released parsers do: when it is
    not blank every candidate reads ``"<|image_pad|> " + tgt_inst + " " + caption`` (even a blank caption, which
    leaves a trailing space), ``" \\n"`` -> ``"\\n"``, plus ``"\\n"``; otherwise every candidate reads
    ``"<|image_pad|> " + tgt_inst`` with the same fix, the captions ignored, and ends with ``"\\n"`` only when
    ``end_newline`` (``image_t2i``; ``image_i2i_vg`` leaves it to the encoding step). ``<|image_1|>`` is removed
    from ``tgt_inst``. A row without any caption (the released code would fail on it) counts as caption-less.
    """
    inst = tgt_inst.replace(IMAGE_1, "")
    if captions and captions[0].strip():
        if len(captions) != n:
            raise ValueError(f"{n} candidate images but {len(captions)} candidate texts")
        return [_fix(IMAGE_PAD + " " + inst + " " + cap) + "\n" for cap in captions]
    text = _fix(IMAGE_PAD + " " + inst) + ("\n" if end_newline else "")
    return [text] * n


def text_only(text: str) -> str:
    """A text encoded without an image: its image placeholders dropped, as the released encoding step does.

    That step ends the text with ``"\\n"`` (unless it is empty), collapses newline runs, maps the placeholders
    to ``IMG`` and, for an item without an image, deletes ``IMG``. It maps ``<|image_1|>`` to ``IMG`` and then
    every ``<|image_pad|>`` to ``IMG`` again, so an ``<|image_1|>`` comes out wrapped twice and its deletion leaves
    ``<|vision_start|><|vision_end|>`` behind: a plain bug. Here every placeholder goes. A text without a
    placeholder is returned unchanged (:func:`to_user_text` does the rest).
    """
    if not _PLACEHOLDER_RE.search(text):
        return text
    if not text.endswith("\n"):
        text += "\n"  # before the deletion, as released: "<|image_1|>" alone becomes "\n", not ""
    return _PLACEHOLDER_RE.sub("", re.sub(r"\n+", "\n", text))


def _one_placeholder(text: str, what: str) -> str:
    n = len(_PLACEHOLDER_RE.findall(text))
    if n != 1:
        # two placeholders for one image cannot be encoded (the released code fails on it, too)
        raise ValueError(f"the {what} text holds {n} image placeholders for its one image: {text[:80]!r}")
    return text


def query_text(q: MMEBQuery) -> str:
    """The query's text in MMEB notation, by its parser (see :func:`image_query_text`, :func:`t2i_query_text`).

    ``image_cls`` / ``image_i2t`` keep the instruction in place; ``image_qa`` / ``image_i2i_vg`` strip it and put it
    on a new line; ``image_t2i`` joins instruction and text with a space and has no image. An image-query parser
    whose row has no query image (the released code would fail) has its placeholder dropped (:func:`text_only`).
    """
    parser = q.query_parser
    if parser == "image_t2i":
        return text_only(t2i_query_text(q.qry_inst, q.qry_text, joined=q.layout == MMEB_EVAL))
    text = image_query_text(q.qry_inst, q.qry_text, strip_instruction=parser in ("image_qa", "image_i2i_vg"))
    return _one_placeholder(text, "query") if q.has_image else text_only(text)


def caption_name(path: str, caption: str) -> str:
    """``path:caption``, the caption's surrounding ``"`` removed (RefCOCO-Matching quotes its expressions)."""
    return path + ":" + caption.strip('"')


def candidates(q: MMEBQuery, mode: str) -> list[Candidate]:
    """The query's own candidate list, gold first, with names for de-duplication.

    ``mode`` is the task's candidate mode; it must be the one of the query's parser.
    """
    if mode not in CANDIDATE_MODES:
        raise ValueError(f"unknown candidate mode {mode!r}; choose one of {CANDIDATE_MODES}")
    parser = q.parser or _MODE_PARSER[mode]
    if PARSER_CANDIDATES[parser] != mode:
        raise ValueError(f"parser {parser} builds {PARSER_CANDIDATES[parser]!r} candidates, not {mode!r}")
    if mode == "text":
        # named by the raw text, as released; the text loses any placeholder since it has no image
        return [Candidate(name=t, text=text_only(t), image_path=None) for t in q.tgt_text]
    paths = q.tgt_img_path
    if any(not p for p in paths):
        raise ValueError(f"candidate mode {mode!r} needs an image for every candidate")
    end_newline = parser == "image_t2i"
    if q.layout == MMEB_EVAL:
        # each tgt_text entry holds the candidate's instruction (and caption): it is that candidate's tgt_inst
        if len(q.tgt_text) != len(paths):
            raise ValueError(f"{len(paths)} candidate images but {len(q.tgt_text)} candidate texts")
        captions = q.tgt_text
        texts = [image_candidate_texts(t, (), 1, end_newline=end_newline)[0] for t in q.tgt_text]
    else:
        captions = q.tgt_text if q.tgt_text else ("",) * len(paths)
        texts = image_candidate_texts(q.tgt_inst, q.tgt_text, len(paths), end_newline=end_newline)
    if len(captions) != len(paths):
        raise ValueError(f"{len(paths)} candidate images but {len(captions)} candidate texts")
    return [Candidate(name=path if mode == "image" else caption_name(path, cap),
                      text=_one_placeholder(text, "candidate"), image_path=path)
            for path, cap, text in zip(paths, captions, texts)]


def to_user_text(text: str) -> str:
    """Encoding step: trailing ``"\\n"`` (unless empty), newline runs collapsed, placeholders mapped to ``IMG``.

    The result is the ``u`` of ``BASE(u)``; an empty text stays empty, so it is encoded as ``BASE("")``, as
    released. Each placeholder becomes ``IMG`` once (the released step wraps ``<|image_1|>`` twice, a bug).
    """
    for bad in _FORBIDDEN:
        if bad in text:
            raise ValueError(f"MMEB text contains the reserved string {bad!r}: {text[:80]!r}")
    if text and not text.endswith("\n"):
        text += "\n"
    text = re.sub(r"\n+", "\n", text)
    # one pass, so the IMAGE_PAD inside IMG is not replaced again
    return _PLACEHOLDER_RE.sub(IMG, text)
