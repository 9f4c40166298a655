"""Exact strings of the MMEB rules (docs/method.md §12)."""

from __future__ import annotations

import pytest

from muco.eval.text import MMEBQuery, candidates, image_candidate_text, query_text, to_user_text
from muco.inputs.templates import IMG, base_template


def q(inst: str, text: str = "", img: str = "q.jpg", tgt_inst: str = "", tgt=(), paths=()) -> MMEBQuery:
    return MMEBQuery(qry_inst=inst, qry_text=text, qry_img_path=img, tgt_inst=tgt_inst, tgt_text=tuple(tgt),
                     tgt_img_path=tuple(paths))


def test_classification_query_with_marker():
    row = q("<|image_1|>\nRepresent the given image for classification")
    assert query_text(row) == "<|image_pad|>\nRepresent the given image for classification\n"
    assert to_user_text(query_text(row)) == IMG + "\nRepresent the given image for classification\n"


def test_vqa_query_appends_text_with_a_space():
    row = q("<|image_1|>\nRepresent the given image with the following question:", "What is the man holding?")
    assert query_text(row) == (
        "<|image_pad|>\nRepresent the given image with the following question: What is the man holding?\n"
    )


def test_instruction_without_marker_keeps_the_space_after_the_placeholder():
    row = q("Find a caption for the news in the given photo.")
    assert query_text(row) == "<|image_pad|> Find a caption for the news in the given photo.\n"
    assert to_user_text(query_text(row)) == IMG + " Find a caption for the news in the given photo.\n"


def test_text_only_query_drops_the_placeholder():
    row = q("Find me an everyday image that matches the given caption:", "A man riding a horse.", img="")
    assert query_text(row) == (
        "Find me an everyday image that matches the given caption: A man riding a horse.\n"
    )
    assert to_user_text(query_text(row)) == query_text(row)


def test_space_newline_fix_and_newline_collapse():
    row = q("Represent the dialogue:", "Q: is it red? \nA: yes \n\n\nQ: big?", img="")
    assert query_text(row) == "Represent the dialogue: Q: is it red?\nA: yes\n\n\nQ: big?\n"
    assert to_user_text(query_text(row)) == "Represent the dialogue: Q: is it red?\nA: yes\nQ: big?\n"


def test_to_user_text_maps_both_markers_once_and_ends_with_newline():
    assert to_user_text("<|image_1|>\n\nabc") == IMG + "\nabc\n"
    assert to_user_text("<|image_pad|> abc\n") == IMG + " abc\n"
    assert to_user_text("plain") == "plain\n"
    assert to_user_text("<|image_pad|>x").count("<|image_pad|>") == 1


def test_full_base_sequence_of_a_classification_query():
    row = q("<|image_1|>\nRepresent the given image for classification")
    seq = base_template(to_user_text(query_text(row)))
    assert seq == (
        "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n"
        "<|vision_start|><|image_pad|><|vision_end|>\nRepresent the given image for classification\n"
        "<|im_end|>\n<|im_start|>assistant\n<|emb|><|im_end|>"
    )


def test_text_candidates_are_raw_and_named_by_text():
    row = q("x", tgt=["Afghan hound, Afghan", "tabby cat"], paths=["", ""])
    cands = candidates(row, "text")
    assert [c.name for c in cands] == ["Afghan hound, Afghan", "tabby cat"]
    assert [c.text for c in cands] == ["Afghan hound, Afghan", "tabby cat"]
    assert all(c.image_path is None for c in cands)
    assert to_user_text(cands[0].text) == "Afghan hound, Afghan\n"


def test_image_candidates_without_captions():
    row = q("", img="", tgt_inst="<|image_1|>\nRepresent the given image.", tgt=["", ""],
            paths=["a.jpg", "b.jpg"])
    cands = candidates(row, "image")
    assert [c.name for c in cands] == ["a.jpg", "b.jpg"]
    assert [c.image_path for c in cands] == ["a.jpg", "b.jpg"]
    assert cands[0].text == "<|image_pad|>\nRepresent the given image.\n"
    assert to_user_text(cands[0].text) == IMG + "\nRepresent the given image.\n"
    # t2i rows may have no tgt_text column content at all
    bare = q("", img="", tgt_inst="Represent the given image.", paths=["a.jpg"])
    assert candidates(bare, "image")[0].text == "<|image_pad|> Represent the given image.\n"


def test_image_candidates_with_captions():
    text = image_candidate_text("Represent the given image with related text information:", "Eiffel tower")
    assert text == "<|image_pad|> Represent the given image with related text information: Eiffel tower\n"
    assert image_candidate_text("Represent the image.", "  ") == "<|image_pad|> Represent the image.\n"


def test_grounding_candidates_are_named_path_colon_caption():
    row = q("<|image_1|>\nSelect the portion of the image that follows the language expressions.", "left man",
            tgt_inst="<|image_1|>\nRepresent the given cropped image of the object.",
            tgt=['"the man on the left"', "dog"], paths=["x.jpg", "x.jpg"])
    cands = candidates(row, "image_caption")
    assert [c.name for c in cands] == ["x.jpg:the man on the left", "x.jpg:dog"]
    assert cands[1].text == "<|image_pad|>\nRepresent the given cropped image of the object. dog\n"
    # the same path without captions is one name per path
    plain = q("", tgt_inst="Represent it.", tgt=["", ""], paths=["a.jpg", "b.jpg"])
    assert [c.name for c in candidates(plain, "image_caption")] == ["a.jpg:", "b.jpg:"]


def test_errors():
    with pytest.raises(ValueError, match="reserved"):
        to_user_text("a <|emb|> b")
    with pytest.raises(ValueError, match="candidate mode"):
        candidates(q("x", tgt=["a"]), "video")
    with pytest.raises(ValueError, match="image for every candidate"):
        candidates(q("x", tgt=["a"], paths=[""]), "image")
    with pytest.raises(ValueError, match="candidate texts"):
        candidates(q("x", tgt=["a", "b"], paths=["p.jpg"]), "image_caption")
