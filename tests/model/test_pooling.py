import pytest
import torch

from muco.model.pooling import EmbeddingCountError, EmbeddingPooler


def test_pooling_order_and_ids():
    emb = 9
    ids = torch.tensor([[1, emb, 2, emb, 0], [emb, 3, 0, 0, 0]])
    hidden = torch.randn(2, 5, 4)
    out = EmbeddingPooler(emb)(hidden, ids, torch.tensor([2, 1]))
    assert out.sample_id.tolist() == [0, 0, 1]
    assert out.turn_id.tolist() == [0, 1, 0]
    ref = torch.nn.functional.normalize(torch.stack([hidden[0, 1], hidden[0, 3], hidden[1, 0]]), dim=-1)
    assert torch.allclose(out.emb, ref)
    assert out.emb.dtype == torch.float32


def test_pooling_casts_to_fp32():
    ids = torch.tensor([[5, 9]])
    out = EmbeddingPooler(9)(torch.randn(1, 2, 4, dtype=torch.bfloat16), ids, 1)
    assert out.emb.dtype == torch.float32
    assert torch.allclose(out.emb.norm(dim=-1), torch.ones(1))


def test_wrong_count_names_the_sample():
    ids = torch.tensor([[9, 9, 0], [9, 1, 1]])
    with pytest.raises(EmbeddingCountError, match=r"'img-42' holds 2 <\|emb\|> tokens but its template put 1"):
        EmbeddingPooler(9)(torch.randn(2, 3, 4), ids, 1, keys=["img-42", "other"])
