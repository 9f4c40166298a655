"""MuCoEncoder: the BASE template per item form, batching, conveniences, mode handling; no import of training.

Loading from any format (:func:`muco.train.checkpoint.load_encoder`) is tested in tests/train/test_checkpoint.py.
"""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from muco.encoder import MuCoEncoder
from muco.inputs.image_policy import ImagePolicy
from muco.inputs.sequence import SequenceEncoder
from muco.inputs.templates import IMG, base_template
from muco.inputs.tokenizer import SpecialTokenIds
from muco.model.embedder import Embedder
from tests.adapted import adapted_tiny_backbone


@pytest.fixture(scope="module")
def model(tiny_tok):
    return adapted_tiny_backbone(tiny_tok, seed=1, dropout=0.1)  # dropout: embed() must switch it off


@pytest.fixture(scope="module")
def encoder(tiny_tok, model):
    return MuCoEncoder.from_parts(tiny_tok, model, image_policy="tiny")


def by_hand(tok, model, seqs, images):
    inputs = SequenceEncoder(tok, ImagePolicy.preset("tiny"))(seqs, images)
    with torch.no_grad():
        return Embedder(model, SpecialTokenIds.from_tokenizer(tok).emb)(inputs, expected=1).emb


def test_item_forms_use_the_single_turn_template(encoder, tiny_tok, model, photos):
    got = encoder.embed(texts=["a cat on a mat", None, "what is this?"], images=[None, photos[0], photos[1]])
    want = by_hand(tiny_tok, model, [base_template("a cat on a mat\n"), base_template(IMG + "\n"),
                                     base_template(IMG + "\nwhat is this?\n")], [None, photos[0], photos[1]])
    assert got.shape == (3, encoder.dim) and got.dtype == torch.float32 and encoder.dim == 128
    assert torch.allclose(got.norm(dim=-1), torch.ones(3), atol=1e-5)
    assert torch.allclose(got, want, atol=1e-5)


def test_batch_size_and_order_do_not_change_embeddings(encoder, photos):
    texts = ["short", "a much longer text about a cat sitting on a mat", "", "mid length text", "x"]
    images = [None, photos[2], photos[3], None, photos[4]]
    one = encoder.embed(texts, images, batch_size=1)
    assert torch.allclose(encoder.embed(texts, images, batch_size=2), one, atol=1e-5)
    assert torch.allclose(encoder.embed(texts, images), one, atol=1e-5)
    rev = encoder.embed(texts[::-1], images[::-1], batch_size=3)
    assert torch.allclose(rev.flip(0), one, atol=1e-5)


def test_conveniences_and_paths(encoder, photos, tmp_path):
    path = tmp_path / "p.png"
    photos[0].save(path)
    assert torch.allclose(encoder.embed_images([path]), encoder.embed_images([photos[0]]), atol=1e-6)
    assert torch.allclose(encoder.embed_texts(["hello"]), encoder.embed(texts=["hello"]), atol=1e-6)
    assert encoder.embed_texts([]).shape == (0, 128)


def test_input_errors(encoder, photos):
    with pytest.raises(ValueError, match="neither text nor image"):
        encoder.embed(texts=[""])
    with pytest.raises(ValueError, match="reserved"):
        encoder.embed(texts=["a literal <|emb|> token"])
    with pytest.raises(ValueError, match="2 texts but 1 images"):
        encoder.embed(texts=["a", "b"], images=[photos[0]])
    with pytest.raises(ValueError):
        encoder.embed()


def test_embed_runs_in_eval_mode_and_restores_training_mode(encoder, model):
    ref = encoder.embed_texts(["dropout must be off"])
    vision_mode = model.get_base_model().visual.training
    model.train()
    model.get_base_model().visual.eval()  # a mixed state must come back as it was
    try:
        assert torch.allclose(encoder.embed_texts(["dropout must be off"]), ref, atol=1e-6)
        assert model.training and not model.get_base_model().visual.training
    finally:
        model.eval()
        model.get_base_model().visual.train(vision_mode)


def test_importing_the_encoder_imports_no_training_code():
    code = ("import sys, muco.encoder; bad = sorted(m for m in sys.modules if m.startswith('muco.train')); "
            "assert not bad, bad")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
