"""Exact strings of the MMEB text rules, parser by parser (docs/evaluation.md §3).

Every expected string below was derived by hand from the released parsers of naver-ai/muco: for the row given,
``src/data/eval_dataset/<parser file>`` followed by the encoding step of ``eval_mmeb.py`` (``encode_embeddings``)
yields exactly that string. The first column is the text in MMEB notation (what the parser returns), the second
the user text ``u`` of ``BASE(u)`` (what is encoded). Where the released code has a plain bug, the expected
string is what it means, and the comment says so.
"""

from __future__ import annotations

import pytest

from muco.eval.text import (
    INSTRUCT,
    MMEB_EVAL,
    MMEBQuery,
    candidates,
    query_text,
    text_only,
    to_user_text,
)
from muco.inputs.templates import IMG, base_template

PAD = "<|image_pad|>"
CLS_INST = "<|image_1|>\nRepresent the given image for classification"
QA_INST = "<|image_1|>\nRepresent the given image with the following question:"
VG_INST = "<|image_1|>\nSelect the portion of the image that follows the language expressions."


def q(inst: str, text: str = "", img: str = "q.jpg", *, parser: str | None = None, tgt_inst: str = "", tgt=(),
      paths=(), layout: str = INSTRUCT) -> MMEBQuery:
    return MMEBQuery(qry_inst=inst, qry_text=text, qry_img_path=img, tgt_inst=tgt_inst, tgt_text=tuple(tgt),
                     tgt_img_path=tuple(paths), parser=parser, layout=layout)


# (parser, qry_inst, qry_text, has image, query text in MMEB notation, user text)
QUERY_RULES = [
    # image_cls_dataset.py: "<|image_pad|> " + inst without <|image_1|> (not stripped), " " + text if text,
    # " \n" -> "\n", + "\n"
    ("image_cls", CLS_INST, "", True,
     PAD + "\nRepresent the given image for classification\n",
     IMG + "\nRepresent the given image for classification\n"),
    # ... an instruction without its own newline keeps the space after the placeholder, and its trailing space
    ("image_cls", "<|image_1|> What digit is written here? ", "", True,
     PAD + "  What digit is written here? \n", IMG + "  What digit is written here? \n"),
    # image_i2t_eval.py: the same rule as image_cls
    ("image_i2t", "Find a caption for the news in the given photo.", "", True,
     PAD + " Find a caption for the news in the given photo.\n",
     IMG + " Find a caption for the news in the given photo.\n"),
    # image_qa_dataset.py: "\n" + inst.strip() -> the instruction always on a new line, stripped
    ("image_qa", QA_INST, "What is in the bowl?", True,
     PAD + "\nRepresent the given image with the following question: What is in the bowl?\n",
     IMG + "\nRepresent the given image with the following question: What is in the bowl?\n"),
    ("image_qa", "<|image_1|> What digit is written here? ", "", True,
     PAD + "\nWhat digit is written here?\n", IMG + "\nWhat digit is written here?\n"),
    ("image_qa", "Find a caption for the news in the given photo.", "", True,
     PAD + "\nFind a caption for the news in the given photo.\n",
     IMG + "\nFind a caption for the news in the given photo.\n"),
    # ... " \n" -> "\n" reaches into the question too; the encoding step collapses the newline run
    ("image_qa", QA_INST, "Q: red? \n\nA: yes", True,
     PAD + "\nRepresent the given image with the following question: Q: red?\n\nA: yes\n",
     IMG + "\nRepresent the given image with the following question: Q: red?\nA: yes\n"),
    # image_i2i_vg_dataset.py: the query rule of image_qa
    ("image_i2i_vg", VG_INST + " ", '"the man on the left"', True,
     PAD + '\nSelect the portion of the image that follows the language expressions. "the man on the left"\n',
     IMG + '\nSelect the portion of the image that follows the language expressions. "the man on the left"\n'),
    # image_t2i_eval.py: inst + " " + text + "\n", no " \n" fix (the space before the newline stays), no image
    ("image_t2i", "Find me an everyday image that matches the given caption:", "A man on a horse. \nOutdoors.", False,
     "Find me an everyday image that matches the given caption: A man on a horse. \nOutdoors.\n",
     "Find me an everyday image that matches the given caption: A man on a horse. \nOutdoors.\n"),
    # ... the text is appended even when empty
    ("image_t2i", "Retrieve an image of this news caption.", "", False,
     "Retrieve an image of this news caption. \n", "Retrieve an image of this news caption. \n"),
    # ... <|image_1|> becomes <|image_pad|>, which the encoding step drops from an item without an image
    ("image_t2i", "<|image_1|>\nFind an image:", "a dog", False,
     "\nFind an image: a dog\n", "\nFind an image: a dog\n"),
    # an image-query parser on a row without a query image (the released code fails opening it): the placeholder
    # is dropped as for any item without an image, its space stays
    ("image_cls", "Represent the given image.", "", False, " Represent the given image.\n",
     " Represent the given image.\n"),
]


@pytest.mark.parametrize("parser, inst, text, has_image, mmeb, user", QUERY_RULES,
                         ids=[f"{r[0]}-{i}" for i, r in enumerate(QUERY_RULES)])
def test_query_rules(parser, inst, text, has_image, mmeb, user):
    row = q(inst, text, img="q.jpg" if has_image else "", parser=parser)
    assert query_text(row) == mmeb
    assert to_user_text(query_text(row)) == user


def test_t2i_never_reads_the_query_image():
    # image_t2i_eval.py does not read qry_img_path: its queries are text only whatever the column holds
    row = q("Find an image:", "a dog", img="stray.jpg", parser="image_t2i")
    assert row.qry_img_path == "" and not row.has_image
    assert query_text(row) == "Find an image: a dog\n"


def test_parsers_differ_on_the_same_row():
    row = dict(inst="<|image_1|> Represent the given image. ", text="")
    got = {p: to_user_text(query_text(q(row["inst"], row["text"], parser=p)))
           for p in ("image_cls", "image_i2t", "image_qa", "image_i2i_vg")}
    assert got == {"image_cls": IMG + "  Represent the given image. \n",
                   "image_i2t": IMG + "  Represent the given image. \n",
                   "image_qa": IMG + "\nRepresent the given image.\n",
                   "image_i2i_vg": IMG + "\nRepresent the given image.\n"}


# (parser, tgt_inst, tgt_text, tgt_img_path, candidate texts in MMEB notation, user texts, names)
CANDIDATE_RULES = [
    # image_cls / image_qa / image_i2t: the raw tgt_text strings, named by them, no image
    ("image_cls", "", ["Afghan hound, Afghan", "tabby cat"], ["", ""],
     ["Afghan hound, Afghan", "tabby cat"], ["Afghan hound, Afghan\n", "tabby cat\n"],
     ["Afghan hound, Afghan", "tabby cat"]),
    # ... an empty text is not given a newline by the encoding step: it is encoded as BASE("")
    ("image_qa", "", ["yes", ""], ["", ""], ["yes", ""], ["yes\n", ""], ["yes", ""]),
    # ... a placeholder in a text-only item is dropped. The released step maps <|image_1|> to IMG and then the
    # <|image_pad|> inside that IMG to IMG again (wrapped twice), so its deletion of IMG leaves
    # "<|vision_start|><|vision_end|>" behind: a plain bug; the placeholder goes entirely here
    ("image_i2t", "", ["a <|image_1|> b", "<|image_1|>"], ["", ""],
     ["a  b\n", "\n"], ["a  b\n", "\n"], ["a <|image_1|> b", "<|image_1|>"]),
    # image_t2i_eval.py: first caption blank -> no captions for the whole row (later ones ignored),
    # "<|image_pad|> " + tgt_inst without <|image_1|>, " \n" -> "\n", + "\n"; named by the image path
    ("image_t2i", "<|image_1|>\nRepresent the given image.", ["", "ignored"], ["a.jpg", "b.jpg"],
     [PAD + "\nRepresent the given image.\n"] * 2, [IMG + "\nRepresent the given image.\n"] * 2,
     ["a.jpg", "b.jpg"]),
    # ... first caption present -> every candidate gets " " + its caption, even a blank one (trailing space stays)
    ("image_t2i", "<|image_1|>\nRepresent the given image with related text information:", ["Eiffel tower", ""],
     ["a.jpg", "b.jpg"],
     [PAD + "\nRepresent the given image with related text information: Eiffel tower\n",
      PAD + "\nRepresent the given image with related text information: \n"],
     [IMG + "\nRepresent the given image with related text information: Eiffel tower\n",
      IMG + "\nRepresent the given image with related text information: \n"],
     ["a.jpg", "b.jpg"]),
    # ... a tgt_inst without <|image_1|> keeps the space after the placeholder
    ("image_t2i", "Represent the given image.", [], ["a.jpg"],
     [PAD + " Represent the given image.\n"], [IMG + " Represent the given image.\n"], ["a.jpg"]),
    # image_i2i_vg_dataset.py: no captions -> no trailing "\n" (the encoding step adds it); named path:caption
    # with the captions even when the texts ignore them
    ("image_i2i_vg", "<|image_1|>\nRepresent the given cropped image of the object", ["", "dog"], ["x.jpg", "y.jpg"],
     [PAD + "\nRepresent the given cropped image of the object"] * 2,
     [IMG + "\nRepresent the given cropped image of the object\n"] * 2, ["x.jpg:", "y.jpg:dog"]),
    # ... captions (RefCOCO-Matching): as image_t2i; the name loses the caption's surrounding quotes
    ("image_i2i_vg", "<|image_1|>\nSelect the portion of the image that follows the language expressions:",
     ['"the man on the left"', '"dog"'], ["x.jpg", "x.jpg"],
     [PAD + '\nSelect the portion of the image that follows the language expressions: "the man on the left"\n',
      PAD + '\nSelect the portion of the image that follows the language expressions: "dog"\n'],
     [IMG + '\nSelect the portion of the image that follows the language expressions: "the man on the left"\n',
      IMG + '\nSelect the portion of the image that follows the language expressions: "dog"\n'],
     ["x.jpg:the man on the left", "x.jpg:dog"]),
]


@pytest.mark.parametrize("parser, tgt_inst, tgt, paths, mmeb, user, names", CANDIDATE_RULES,
                         ids=[f"{r[0]}-{i}" for i, r in enumerate(CANDIDATE_RULES)])
def test_candidate_rules(parser, tgt_inst, tgt, paths, mmeb, user, names):
    from muco.eval.text import PARSER_CANDIDATES

    row = q("x", parser=parser, tgt_inst=tgt_inst, tgt=tgt, paths=paths)
    cands = candidates(row, PARSER_CANDIDATES[parser])
    assert [c.text for c in cands] == mmeb
    assert [to_user_text(c.text) for c in cands] == user
    assert [c.name for c in cands] == names
    image_mode = PARSER_CANDIDATES[parser] != "text"
    assert [c.image_path for c in cands] == (list(paths) if image_mode else [None] * len(paths))


def test_encoding_step():
    # eval_mmeb.py encode_embeddings: "\n" appended when missing (not to an empty text), newline runs collapsed,
    # <|image_1|> / <|image_pad|> -> IMG once each
    assert to_user_text("plain") == "plain\n"
    assert to_user_text("") == ""
    assert to_user_text("a\n\n\nb \n") == "a\nb \n"
    assert to_user_text("<|image_1|>\n\nabc") == IMG + "\nabc\n"
    assert to_user_text("<|image_pad|> abc\n") == IMG + " abc\n"
    assert to_user_text(IMG + "x") == IMG + "x\n"  # idempotent: IMG is not wrapped again
    assert base_template(to_user_text("")) == (
        "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n<|im_end|>\n"
        "<|im_start|>assistant\n<|emb|><|im_end|>"
    )
    assert text_only("no placeholder") == "no placeholder"  # left to to_user_text


def test_full_base_sequence_of_a_vqa_query():
    row = q(QA_INST, "What is in the bowl?", parser="image_qa")
    assert base_template(to_user_text(query_text(row))) == (
        "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n"
        "<|vision_start|><|image_pad|><|vision_end|>\nRepresent the given image with the following question: "
        "What is in the bowl?\n<|im_end|>\n<|im_start|>assistant\n<|emb|><|im_end|>"
    )


def test_mmeb_eval_rows_give_the_texts_of_their_instruct_rows():
    """An MMEB-eval row holds instruction and text joined; its texts are those of the split MMEB_Test_Instruct row."""
    pairs = [
        ("image_cls", q(CLS_INST, "", parser="image_cls"), q(CLS_INST, "", parser="image_cls", layout=MMEB_EVAL)),
        ("image_qa", q(QA_INST, "What is in the bowl?", parser="image_qa"),
         q(QA_INST + " What is in the bowl?", parser="image_qa", layout=MMEB_EVAL)),
        ("image_t2i", q("Find me an everyday image that matches the given caption:", "A dog.", parser="image_t2i"),
         q("Find me an everyday image that matches the given caption: A dog.", parser="image_t2i",
           layout=MMEB_EVAL)),
    ]
    for parser, instruct, joined in pairs:
        assert query_text(instruct) == query_text(joined), parser
    assert query_text(pairs[2][2]) == "Find me an everyday image that matches the given caption: A dog.\n"

    # image candidates: each tgt_text entry holds the candidate's instruction (and caption)
    inst = "<|image_1|>\nRepresent the given image with related text information:"
    split = q("x", img="", parser="image_t2i", tgt_inst=inst, tgt=["Eiffel tower", "Louvre"], paths=["a", "b"])
    joined = q("x", img="", parser="image_t2i", tgt=[inst + " Eiffel tower", inst + " Louvre"], paths=["a", "b"],
               layout=MMEB_EVAL)
    assert [c.text for c in candidates(joined, "image")] == [c.text for c in candidates(split, "image")] == [
        PAD + "\nRepresent the given image with related text information: Eiffel tower\n",
        PAD + "\nRepresent the given image with related text information: Louvre\n"]
    vg = "<|image_1|>\nSelect the portion of the image that follows the language expressions:"
    split = q(vg, parser="image_i2i_vg", tgt_inst=vg, tgt=['"dish"'], paths=["x.jpg"])
    joined = q(vg, parser="image_i2i_vg", tgt=[vg + ' "dish"'], paths=["x.jpg"], layout=MMEB_EVAL)
    (a,), (b,) = candidates(split, "image_caption"), candidates(joined, "image_caption")
    assert to_user_text(a.text) == to_user_text(b.text) == (
        IMG + '\nSelect the portion of the image that follows the language expressions: "dish"\n')
    assert b.text == PAD + '\nSelect the portion of the image that follows the language expressions: "dish"'
    assert (a.name, b.name) == ("x.jpg:dish", "x.jpg:" + vg + ' "dish')  # unique per text; only de-duplicates


def test_a_hand_built_query_without_parser():
    # outside a task: image_cls rules with a query image, image_t2i without; candidates follow the mode
    assert query_text(q(CLS_INST)) == PAD + "\nRepresent the given image for classification\n"
    assert query_text(q("Find an image:", "a dog", img="")) == "Find an image: a dog\n"
    row = q("x", img="", tgt_inst="Represent it.", tgt=["", ""], paths=["a.jpg", "b.jpg"])
    assert [c.text for c in candidates(row, "image_caption")] == [PAD + " Represent it."] * 2
    assert [c.text for c in candidates(row, "image")] == [PAD + " Represent it.\n"] * 2


def test_errors():
    with pytest.raises(ValueError, match="reserved"):
        to_user_text("a <|emb|> b")
    with pytest.raises(ValueError, match="candidate mode"):
        candidates(q("x", tgt=["a"]), "video")
    with pytest.raises(ValueError, match="parser image_t2i builds 'image' candidates, not 'text'"):
        candidates(q("x", parser="image_t2i", tgt=["a"]), "text")
    with pytest.raises(ValueError, match="image for every candidate"):
        candidates(q("x", tgt=["a"], paths=[""]), "image")
    with pytest.raises(ValueError, match="candidate texts"):
        candidates(q("x", tgt=["a", "b"], paths=["p.jpg"]), "image_caption")
    # two placeholders for one image cannot be encoded (the released code fails on them too)
    with pytest.raises(ValueError, match="query text holds 2 image placeholders"):
        query_text(q(QA_INST, "<|image_1|> what?", parser="image_qa"))
    with pytest.raises(ValueError, match="candidate text holds 2 image placeholders"):
        candidates(q("x", parser="image_t2i", tgt_inst="Represent:", tgt=["<|image_1|>"], paths=["a.jpg"]), "image")
    with pytest.raises(ValueError, match="unknown MMEB parser"):
        q("x", parser="image_vqa")
    with pytest.raises(ValueError, match="unknown MMEB layout"):
        q("x", layout="MMEB-V2")
