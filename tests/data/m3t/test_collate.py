import pytest
import torch

from muco.data.m3t.collate import PretrainCollator, PretrainSample
from muco.inputs.image_policy import ImagePolicy
from muco.inputs.sequence import BadSampleError, SequenceEncoder
from muco.inputs.templates import base_template, single_turn_user_text
from muco.inputs.tokenizer import SpecialTokenIds


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


def _neg_samples(photos) -> list[PretrainSample]:
    """Two samples, K=3, two negative draws each; sample 1 misses its middle negative in draw 0 and all of
    draw 1 but the last."""
    return [
        PretrainSample("k0", photos[0], ["q1", "q2", "q3"], ["t1", "t2", "t3"], turns=[4, 0, 2],
                       negatives=[["wrong four", "wrong zero", "wrong two"], ["bad four", "bad zero", "bad two"]]),
        PretrainSample("k1", photos[1], ["r1", "r2", "r3"], ["u1", "u2", "u3"], turns=[1, 6, 5],
                       negatives=[["other one", None, "other five"], [None, None, "t1"]]),
    ]


def test_negative_sequences_are_packed_per_sample_and_draw(tiny_tok, photos):
    from muco.data.m3t.collate import MISSING_NEGATIVE
    from muco.inputs.sequence import text_id
    from muco.inputs.templates import pretrain_template

    coll = PretrainCollator(tiny_tok, ImagePolicy.preset("tiny"))
    ids = SpecialTokenIds.from_tokenizer(tiny_tok)
    samples = _neg_samples(photos)
    b = coll(samples)
    # 2 samples x 2 draws = 4 sequences of K=3 turns, text only
    assert b["negative"]["input_ids"].shape[0] == 4 and "pixel_values" not in b["negative"]
    assert b["negative_num_turns"].tolist() == [3, 3, 3, 3]
    assert (b["negative"]["input_ids"] == ids.emb).sum(1).tolist() == [3, 3, 3, 3]
    flat = [n for s in samples for d in s.negatives for n in d]  # sample, draw, turn order
    assert b["negative_valid"].tolist() == [n is not None for n in flat]
    assert b["negative_valid"].dtype == torch.bool
    nid = b["negative_text_id"].tolist()
    assert [i for i, n in zip(nid, flat) if n is not None] == [text_id(n) for n in flat if n is not None]
    assert all(i < 0 for i, n in zip(nid, flat) if n is None) and len(set(nid)) == len(nid)
    # the same hash as the targets': "t1" as a negative of k1 equals k0's turn-1 positive
    assert nid[-1] == int(b["target_text_id"][0])
    # sequence 2 is sample 1's draw 0: PRETRAIN(other one, <placeholder>, other five), like the targets' template
    row = b["negative"]["input_ids"][2][b["negative"]["attention_mask"][2].bool()]
    assert tiny_tok.decode(row) == pretrain_template(["other one", MISSING_NEGATIVE, "other five"])
    val = coll([PretrainSample("v", None, ["q"], ["t"])])  # no negatives drawn: none in the batch
    assert not any(k.startswith("negative") for k in val)


def test_negatives_must_be_drawn_for_every_sample_and_turn(tiny_tok):
    coll = PretrainCollator(tiny_tok, ImagePolicy.preset("tiny"))
    with pytest.raises(BadSampleError, match="'b' has no negatives"):
        coll([PretrainSample("a", None, ["q"], ["t"], negatives=[["n"]]), PretrainSample("b", None, ["q"], ["t"])])
    with pytest.raises(BadSampleError, match="'a': draw 0 has 2 negatives for 1 turns"):
        coll([PretrainSample("a", None, ["q"], ["t"], negatives=[["n", "m"]])])
    with pytest.raises(BadSampleError, match="'b': 2 negative draws, expected 1"):
        coll([PretrainSample("a", None, ["q"], ["t"], negatives=[["n"]]),
              PretrainSample("b", None, ["q"], ["t"], negatives=[["n"], ["m"]])])


def test_packed_negative_sequence_yields_k_embeddings_in_turn_order(tiny_tok, photos):
    """One forward of a K-turn negative sequence gives its K negatives in turn order: with causal attention,
    embedding k equals the last embedding of the same sequence cut after turn k (as for queries, see
    tests/model/test_backbone.py), placeholders of missing negatives included."""
    from muco.data.m3t.collate import MISSING_NEGATIVE
    from muco.inputs.templates import pretrain_template
    from muco.model.backbone import BackboneConfig, build_backbone
    from muco.model.embedder import Embedder

    torch.manual_seed(0)
    model = build_backbone(BackboneConfig(preset="tiny", attn_implementation="eager"), tiny_tok)
    embedder = Embedder(model, SpecialTokenIds.from_tokenizer(tiny_tok).emb).eval()
    samples = _neg_samples(photos)
    b = PretrainCollator(tiny_tok, ImagePolicy.preset("tiny"))(samples)
    with torch.no_grad():
        out = embedder(b["negative"], b["negative_num_turns"])
    assert out.emb.shape == (12, 128)
    assert out.sample_id.tolist() == [s for s in range(4) for _ in range(3)]
    assert out.turn_id.tolist() == [0, 1, 2] * 4
    enc = SequenceEncoder(tiny_tok, ImagePolicy.preset("tiny"))
    draws = [d for s in samples for d in s.negatives]
    for seq, draw in enumerate(draws):
        texts = [MISSING_NEGATIVE if n is None else n for n in draw]
        prefixes = [pretrain_template(texts[: k + 1]) for k in range(3)]
        with torch.no_grad():
            ref = [embedder(enc([p], [None]), k + 1).emb[-1] for k, p in enumerate(prefixes)]
        for k in range(3):
            torch.testing.assert_close(out.emb[seq * 3 + k], ref[k], atol=1e-5, rtol=1e-4)
    # and the turns really differ: not K copies of one vector
    assert not torch.allclose(out.emb[0], out.emb[1], atol=1e-3)
