"""chunked_topk equals a brute-force top-k for any chunk sizes, k larger than a chunk included."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from muco.mine.search import chunked_topk


def _data(nq: int, nc: int, d: int = 16, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return F.normalize(torch.randn(nq, d, generator=g), dim=-1), F.normalize(torch.randn(nc, d, generator=g), dim=-1)


@pytest.mark.parametrize("query_chunk,corpus_chunk,k", [(1, 1, 5), (7, 3, 10), (13, 50, 20), (100, 100, 37),
                                                         (4, 9, 57)])
def test_equals_brute_force(query_chunk, corpus_chunk, k):
    q, c = _data(29, 57)
    want_s, want_i = (q @ c.T).topk(min(k, 57), dim=1)
    got_s, got_i = chunked_topk(q, c, k, query_chunk, corpus_chunk)
    assert got_s.shape == (29, min(k, 57)) and got_s.dtype == torch.float32 and got_i.dtype == torch.long
    assert torch.allclose(got_s, want_s, atol=1e-6)
    assert torch.equal(got_i, want_i)  # random data: no ties
    assert torch.allclose(torch.gather(q @ c.T, 1, got_i), got_s, atol=1e-6)


def test_edge_cases_and_errors():
    q, c = _data(3, 4)
    s, i = chunked_topk(q, c, 10, 2, 3)  # k > corpus: all of it, sorted
    assert s.shape == (3, 4) and torch.equal(i.sort(1).values, torch.arange(4).expand(3, 4))
    assert chunked_topk(q[:0], c, 2)[0].shape == (0, 2)
    assert torch.equal(chunked_topk(q.double(), c, 2)[1], chunked_topk(q, c, 2)[1])  # fp32 scores whatever came in
    with pytest.raises(ValueError, match="queries"):
        chunked_topk(q, c[:, :3], 2)
    with pytest.raises(ValueError, match=">= 1"):
        chunked_topk(q, c, 0)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_with_corpus_on_cpu():
    q, c = _data(300, 1000, 64)
    want_s, want_i = chunked_topk(q, c, 25, 64, 128)
    got_s, got_i = chunked_topk(q, c, 25, 64, 128, device="cuda")
    assert torch.allclose(got_s, want_s, atol=1e-5) and torch.equal(got_i, want_i)
    got_s, got_i = chunked_topk(q.cuda(), c.cuda(), 25, 64, 128)
    assert torch.allclose(got_s, want_s, atol=1e-5) and torch.equal(got_i, want_i)
