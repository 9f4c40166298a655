"""Fine-tuning sequences: two <|emb|> each, and the first one is the inference (BASE) embedding (docs/method.md §4)."""

from __future__ import annotations

import pytest
import torch

from muco.data.pairs.collate import FinetuneCollator, PairSample
from muco.inputs.image_policy import ImagePolicy
from muco.inputs.sequence import BadSampleError, SequenceEncoder
from muco.inputs.templates import MASK_TOKEN, base_template, single_turn_user_text
from muco.inputs.tokenizer import SpecialTokenIds
from muco.model.backbone import BackboneConfig, build_backbone
from muco.model.embedder import Embedder


@pytest.fixture(scope="module")
def embedder(tiny_tok):
    return Embedder(build_backbone(BackboneConfig(preset="tiny"), tiny_tok).eval(),
                    SpecialTokenIds.from_tokenizer(tiny_tok).emb)


def samples(photos) -> list[PairSample]:
    return [
        PairSample("a", "What is shown?", photos[0], "an astronaut.", None, f"an {MASK_TOKEN}",
                   f"Image description: {MASK_TOKEN} suit\nWhat is {MASK_TOKEN}", neg_text="a diver."),
        PairSample("b", "Find the cat picture", None, "Represent the given image.", photos[1], MASK_TOKEN,
                   f"Find {MASK_TOKEN} picture\n", neg_text="Represent the given image.", neg_image=photos[2]),
        PairSample("c", "a longer query text without any image at all", None, "short", None, MASK_TOKEN,
                   MASK_TOKEN),  # no negative
    ]


def test_two_emb_per_sequence_and_first_equals_base(tiny_tok, photos, embedder):
    policy = ImagePolicy.preset("tiny")
    ss = samples(photos)
    batch = FinetuneCollator(tiny_tok, policy)(ss)
    emb_id = SpecialTokenIds.from_tokenizer(tiny_tok).emb
    for side in ("query", "target"):
        assert (batch[side]["input_ids"] == emb_id).sum(1).tolist() == [2, 2, 2]
    assert (batch["negative"]["input_ids"] == emb_id).sum(1).tolist() == [1, 1, 1]
    assert batch["negative_valid"].tolist() == [True, True, False]
    assert batch["target_text_id"][1] != batch["negative_text_id"][1]  # image items are never "the same text"

    base = SequenceEncoder(tiny_tok, policy)
    with torch.no_grad():
        for side, texts, images in (
            ("query", [s.qry_text for s in ss], [s.qry_image for s in ss]),
            ("target", [s.pos_text for s in ss], [s.pos_image for s in ss]),
        ):
            pooled = embedder(batch[side], 2, batch["keys"])  # the pooler asserts two per sequence
            assert pooled.turn_id.tolist() == [0, 1] * 3
            first = pooled.emb[pooled.turn_id == 0]
            users = [single_turn_user_text(t, im is not None) for t, im in zip(texts, images)]
            ref = embedder(base([base_template(u) for u in users], images), 1).emb
            torch.testing.assert_close(first, ref, atol=2e-5, rtol=1e-4)
            # the second (reconstruction) embedding is a different vector
            assert (pooled.emb[pooled.turn_id == 1] - first).abs().max() > 1e-3


def test_reserved_strings_refused(tiny_tok, photos):
    s = samples(photos)[0]
    s.masked_qry = "sneaky <|emb|>"
    with pytest.raises(BadSampleError, match="masked_qry contains the reserved string"):
        FinetuneCollator(tiny_tok, ImagePolicy.preset("tiny"))([s])
