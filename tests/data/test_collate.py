import pytest
import torch

from muco.data.collate import BadSampleError, PretrainCollator, PretrainSample, SequenceEncoder
from muco.data.image_policy import ImagePolicy
from muco.data.templates import base_template, single_turn_user_text
from muco.model.tokenizer import SpecialTokenIds


def test_image_pad_expanded_to_visual_tokens(tiny_tok, photos):
    enc = SequenceEncoder(tiny_tok, ImagePolicy.preset("tiny"))
    ids = SpecialTokenIds.from_tokenizer(tiny_tok)
    texts = [base_template(single_turn_user_text("a", True)), base_template("text only\n"),
             base_template(single_turn_user_text("b", True))]
    out = enc(texts, [photos[0], None, photos[1]])
    grid = out["image_grid_thw"]
    assert grid.shape == (2, 3)
    n_vis = (grid.prod(-1) // 4).tolist()
    per_row = (out["input_ids"] == ids.image_pad).sum(1).tolist()
    assert per_row == [n_vis[0], 0, n_vis[1]]
    assert torch.equal(out["mm_token_type_ids"], (out["input_ids"] == ids.image_pad).int())
    # patches of all images stacked: t*h*w uint8 rows of 3*14*14 values (normalised on the device)
    assert out["pixel_values"].shape == (int(grid.prod(-1).sum()), 588)
    assert out["pixel_values"].dtype == torch.uint8
    # right padding, no truncation: every row ends its real tokens with <|im_end|>
    lengths = out["attention_mask"].sum(1)
    assert int(lengths.max()) == out["input_ids"].shape[1]
    im_end = tiny_tok.convert_tokens_to_ids("<|im_end|>")
    assert all(int(out["input_ids"][i, n - 1]) == im_end for i, n in enumerate(lengths.tolist()))


def test_policy_budget_is_respected(tiny_tok, photos):
    policy = ImagePolicy(min_pixels=3136, max_pixels=6272)
    out = SequenceEncoder(tiny_tok, policy)([base_template(single_turn_user_text("a", True))], [photos[0]])
    pixels = int(out["image_grid_thw"][0, 1] * out["image_grid_thw"][0, 2]) * 14 * 14
    assert 3136 <= pixels <= 6272


def test_tiny_images_upsampled(tiny_tok):
    from PIL import Image

    out = SequenceEncoder(tiny_tok, ImagePolicy.preset("tiny"))(
        [base_template(single_turn_user_text("a", True))], [Image.new("RGB", (10, 7))]
    )
    assert out["image_grid_thw"][0, 1:].min() >= 2


def test_placeholder_without_image_is_refused(tiny_tok):
    enc = SequenceEncoder(tiny_tok, ImagePolicy.preset("tiny"))
    with pytest.raises(ValueError, match="placeholders"):
        enc([base_template(single_turn_user_text("a", True))], [None])


def test_pretrain_collator_layout(tiny_tok, photos):
    coll = PretrainCollator(tiny_tok, ImagePolicy.preset("tiny"))
    ids = SpecialTokenIds.from_tokenizer(tiny_tok)
    samples = [PretrainSample("k0", photos[0], ["q1", "q2", "q3"], ["t1", "t2", "t3"]),
               PretrainSample("k1", None, ["r1", "r2"], ["u1", "u2"])]
    b = coll(samples)
    assert b["keys"] == ["k0", "k1"]
    assert b["num_turns"].tolist() == [3, 2]
    assert (b["query"]["input_ids"] == ids.emb).sum(1).tolist() == [3, 2]
    assert (b["target"]["input_ids"] == ids.emb).sum(1).tolist() == [3, 2]
    assert "pixel_values" not in b["target"]
    # the image sits in turn 1 only
    q0 = tiny_tok.decode(b["query"]["input_ids"][0][b["query"]["attention_mask"][0].bool()])
    assert q0.count("<|vision_start|>") == 1
    assert q0.index("<|vision_start|>") < q0.index("q1") < q0.index("q2")


def test_literal_special_token_in_data_names_the_sample(tiny_tok):
    coll = PretrainCollator(tiny_tok, ImagePolicy.preset("tiny"))
    with pytest.raises(BadSampleError, match=r"'bad-7'.*<\|emb\|>"):
        coll([PretrainSample("bad-7", None, ["fine", "not <|emb|> fine"], ["a", "b"])])
