"""chunked_topk equals a brute-force top-k under the tie rule (higher exact score, then lower corpus index) for any
chunk sizes, matmul dtype and split of the corpus into shards, exact duplicate scores included."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from muco.mine.search import (
    Shard,
    chunked_topk,
    merge_topk,
    pair_scores,
    rank_keys,
    score_error_bounds,
    search_shard,
)


def _data(nq: int, nc: int, d: int = 16, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return F.normalize(torch.randn(nq, d, generator=g), dim=-1), F.normalize(torch.randn(nc, d, generator=g), dim=-1)


def brute_force(q: torch.Tensor, c: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Every exact score, sorted by score descending; a stable sort keeps equal scores in index order."""
    s = pair_scores(q, c[None].expand(q.shape[0], -1, -1))
    order = torch.sort(-s, dim=1, stable=True).indices[:, :k]
    return s.gather(1, order), order


def tied_data(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Queries whose top-k cut through groups of exactly equal scores: 40 copies of one row spread over the
    corpus (query 0 is that row); 40 rows sharing their first coordinate 0.5 (query 1 is e_0, so each of them
    scores exactly 0.5); for each other query, 3 copies of its row at place t (0-based), t in 1, 8, 38, 118."""
    q, c = _data(23, 400, seed=seed)
    copies, halves = torch.arange(3, 400, 10), torch.arange(6, 400, 10)
    c[copies] = c[1].clone()
    q[0] = c[1]
    rest = F.normalize(torch.randn(40, 15, generator=torch.Generator().manual_seed(seed + 1)), dim=-1)
    c[halves] = torch.cat([torch.full((40, 1), 0.5), 0.75**0.5 * rest], 1)
    q[1] = F.one_hot(torch.tensor(0), 16).float()
    used = {1, *copies.tolist(), *halves.tolist()}
    for r in range(2, 23):
        t = (1, 8, 38, 118)[r % 4]
        order = [i for i in (c @ q[r]).argsort(descending=True).tolist()]
        src, below = order[t], [i for i in order[t + 1 :] if i not in used][5:8]
        c[below] = c[src].clone()
        used |= {src, *below}
    return q, c


def _has_boundary_ties(q: torch.Tensor, c: torch.Tensor, k: int) -> bool:
    s, _ = brute_force(q, c, k + 1)
    return bool((s[:, k - 1] == s[:, k]).any())


@pytest.mark.parametrize("query_chunk,corpus_chunk,k", [(1, 1, 5), (7, 3, 10), (13, 50, 20), (100, 100, 37),
                                                         (4, 9, 57)])
def test_equals_brute_force(query_chunk, corpus_chunk, k):
    q, c = _data(29, 57)
    want_s, want_i = brute_force(q, c, k)
    got_s, got_i = chunked_topk(q, c, k, query_chunk, corpus_chunk)
    assert got_s.shape == (29, min(k, 57)) and got_s.dtype == torch.float32 and got_i.dtype == torch.long
    assert torch.equal(got_s, want_s) and torch.equal(got_i, want_i)
    assert torch.allclose(torch.gather(q @ c.T, 1, got_i), got_s, atol=1e-6)  # the exact score is the cosine


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("query_chunk,corpus_chunk,k", [(1, 7, 3), (5, 64, 10), (23, 37, 40), (8, 1000, 120)])
def test_ties_follow_the_rule_for_any_chunks_and_matmul_dtype(dtype, query_chunk, corpus_chunk, k):
    q, c = tied_data()
    assert _has_boundary_ties(q, c, k)  # the k-th place is shared: which rows are kept is up to the rule
    want_s, want_i = brute_force(q, c, k)
    got_s, got_i = chunked_topk(q, c, k, query_chunk, corpus_chunk, dtype=dtype)
    assert torch.equal(got_s, want_s) and torch.equal(got_i, want_i)
    copies = (c == q[0]).all(1).nonzero()[:, 0]  # query 0's own row and its copies: the lowest rows first
    assert len(copies) > 40 and got_i[0, : len(copies)].tolist() == copies[:k].tolist()


@pytest.mark.parametrize("world", [2, 3, 5])
def test_shards_merged_equal_the_whole_corpus(world):
    """Strided, contiguous and scattered shares, each searched on its own, merged: the single-corpus result."""
    q, c = tied_data(seed=3)
    k = 30
    want = chunked_topk(q, c, k, 8, 16)
    bounds = [len(c) * r // world for r in range(world + 1)]
    owner = torch.randint(0, world, (len(c),), generator=torch.Generator().manual_seed(world))
    scattered = [(owner == r).nonzero()[:, 0] for r in range(world)]
    for shards in ([Shard(c[r::world], r, world) for r in range(world)],
                   [Shard(c[bounds[r] : bounds[r + 1]], bounds[r]) for r in range(world)],
                   [Shard(c[rows], index=rows) for rows in scattered]):
        parts = [chunked_topk(q, s, k, 8, 16) for s in shards]
        merged = merge_topk(torch.cat([p[0] for p in parts], 1), torch.cat([p[1] for p in parts], 1), k)
        assert torch.equal(merged[0], want[0]) and torch.equal(merged[1], want[1])
        # the same through search_shard's running top-k, shard after shard, in any order
        best = (torch.full((len(q), k), float("-inf")), torch.full((len(q), k), -1, dtype=torch.long))
        for s in reversed(shards):
            best = search_shard(q, s, *best, corpus_chunk=11)
        assert torch.equal(best[0], want[0]) and torch.equal(best[1], want[1])


def test_bounded_passes_and_a_corpus_of_equal_scores(monkeypatch):
    """Tiny memory budgets (re-scoring 2 candidates and matmul passes of ~50 scores at a time) change nothing;
    nor does a corpus where every row scores the same (the candidate pass grows to the whole corpus)."""
    import muco.mine.search as search

    q, c = tied_data()
    want = chunked_topk(q, c, 30, 8, 64)
    monkeypatch.setattr(search, "RESCORE_ELEMS", 2 * 16)
    monkeypatch.setattr(search, "CANDIDATE_ELEMS", 50)
    got = chunked_topk(q, c, 30, 8, 64)
    assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])
    flat = torch.cat([torch.full((300, 1), 0.6), 0.8 * F.normalize(torch.randn(300, 15), dim=-1)], 1)
    s, i = chunked_topk(F.one_hot(torch.tensor([0, 0]), 16).float(), flat, 7, 2, 32)
    assert torch.equal(i, torch.arange(7).expand(2, 7)) and (s == 0.6).all()


def test_pair_scores_do_not_depend_on_the_batch():
    q, c = _data(6, 50, d=1536)
    rows = c[torch.randperm(50, generator=torch.Generator().manual_seed(1))].reshape(5, 10, 1536)
    full = pair_scores(q[:5], rows)
    assert torch.equal(full[2:3, 4:7], pair_scores(q[2:3], rows[2:3, 4:7]))
    assert torch.equal(pair_scores(q[:1], rows[:1, :1]), pair_scores(q[:1].double(), rows[:1, :1]))
    assert torch.allclose(full, torch.einsum("bd,bmd->bm", q[:5].double(), rows.double()).float(), atol=1e-7)


def test_rank_keys_order():
    s = torch.tensor([[0.5, 0.5, -0.0, 0.0, -0.25, -0.5, float("-inf"), 0.9]])
    i = torch.tensor([[7, 3, 4, 2, 1, 0, 5, -1]])
    order = rank_keys(s, i).argsort(descending=True)[0].tolist()
    # higher score first; equal scores (0.5 and 0.5, -0.0 and 0.0) lower index first; the empty slot last
    assert [i[0, j].item() for j in order] == [3, 7, 2, 4, 1, 0, 5, -1]


def test_the_matmul_error_bound_holds():
    """The certified bound covers the matmul's error (bf16 rounds inputs to 8 bits: errors near 1e-2 possible),
    and is tight enough to be useful (fp32: ~1e-5; bf16: well under the 2^-6 of an unknown accumulation)."""
    q, c = _data(64, 2048, d=256, seed=5)
    q[0] = c[3] + 2.0**-9  # rows whose bf16 rounding errors line up
    c[4] = q[0]
    shard = Shard(c)
    exact = pair_scores(q, c[None].expand(64, -1, -1))
    for dtype, cap in ((torch.float32, 1e-4), (torch.bfloat16, 2.0**-7)):
        eps = score_error_bounds(q, shard, dtype, fp32_out=True)
        approx = (q.to(dtype).float() @ c.to(dtype).float().T)  # bf16 inputs, fp32 accumulation
        assert ((approx - exact).abs() <= eps[:, None]).all() and (eps < cap).all()
    assert (approx - exact).abs().max() > eps.max() / 10  # bf16's bound is within 10x of its worst error
    loose = score_error_bounds(q, shard, torch.bfloat16, fp32_out=False)
    approx = (q.bfloat16() @ c.bfloat16().T).float()  # bf16 output: one more rounding
    assert ((approx - exact).abs() <= loose[:, None]).all()


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
    with pytest.raises(ValueError, match="finite"):
        chunked_topk(q, torch.full((2, 16), float("nan")), 1)
    with pytest.raises(ValueError, match="finite"):
        chunked_topk(torch.full((1, 16), float("inf")), c, 1)
    shard = Shard(c, start=2, step=3)
    assert shard.global_index(torch.tensor([0, 3])).tolist() == [2, 11]
    assert shard.local_index(torch.tensor([2, 5, 11, 14, 3, 0])).tolist() == [0, 1, 3, -1, -1, -1]
    assert Shard(c[:0], 5, 2).local_index(torch.tensor([5])).tolist() == [-1]
    with pytest.raises(ValueError, match="increasing"):
        Shard(c, index=torch.tensor([0, 2, 2, 3]))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_bf16_equals_cpu_fp32():
    q, c = tied_data()
    want = chunked_topk(q, c, 25, 8, 64)
    for corpus in (c, Shard.prepare(c, device="cuda")):  # on the CPU, chunks travel; prepared: bf16 on the GPU
        got = chunked_topk(q, corpus, 25, 8, 64, device="cuda")
        assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])
