"""Selection on hand-made embeddings: hand-computed top-k, exclusions, the margin's boundary, counts."""

from __future__ import annotations

import math

import pytest
import torch

from muco.mine.select import SelectConfig, mine_negatives, normalize_text, normalized_ids, select_negatives
from muco.mine.summary import summarize

# corpus texts and their cosine with the query direction [1, 0] (2-D unit vectors at those cosines)
CORPUS = {
    "the positive": 0.80,
    "another turn of the same image": 0.95,
    "The  positive!": 0.88,  # near-duplicate of the positive
    "just above the margin": 0.751,  # > 0.80 - 0.05: a likely false negative
    "just below the margin": 0.749,  # kept, rank 1
    "second": 0.60,
    "third": 0.50,
    "fourth": 0.30,
    "far away": -0.50,
}
TEXTS = list(CORPUS)


def _vec(cos: float, sign: float = 1.0) -> list[float]:
    return [cos, sign * math.sqrt(1 - cos * cos)]


def _mine(cfg: SelectConfig, query_chunk: int = 1, corpus_chunk: int = 2):
    corpus = torch.tensor([_vec(c, 1 if i % 2 else -1) for i, c in enumerate(CORPUS.values())])
    queries = torch.tensor([[1.0, 0.0], [1.0, 0.0]])  # turn 0 (positive "the positive") and turn 1 of one sample
    pos_idx = torch.tensor([0, 1])
    same_idx = torch.tensor([[0, 1], [0, 1]])
    return mine_negatives(queries, corpus, pos_idx, same_idx, normalized_ids(TEXTS), cfg, query_chunk, corpus_chunk)


def _kept(sel, row: int) -> list[tuple[str, float]]:
    n = int(sel.kept[row])
    return [(TEXTS[int(i)], round(float(s), 4)) for i, s in zip(sel.indices[row, :n], sel.sims[row, :n])]


@pytest.mark.parametrize("chunks", [(1, 2), (2, 9), (2, 4)])
def test_hand_computed_top_k(chunks):
    pos_sim, sel = _mine(SelectConfig(top_k=3, margin=0.05), *chunks)
    assert torch.allclose(pos_sim, torch.tensor([0.80, 0.95]))
    # turn 0: positive, the other turn's target, the near-duplicate and the false negative above pos - margin are
    # dropped; the one just below the threshold is the hardest kept negative
    assert _kept(sel, 0) == [("just below the margin", 0.749), ("second", 0.6), ("third", 0.5)]
    # turn 1 (pos 0.95, threshold 0.90): "the positive" is now a same-image target and "The  positive!" its
    # near-duplicate; both margin cases are far below 0.90 and kept
    assert _kept(sel, 1) == [("just above the margin", 0.751), ("just below the margin", 0.749), ("second", 0.6)]
    assert sel.indices.shape == (2, 3) and torch.equal(sel.kept, torch.tensor([3, 3]))
    # counted over the candidates scanned until top_k were kept
    assert sel.filtered == {"positive": 2, "same_sample": 2, "near_duplicate": 2, "false_negative": 1}


def test_margin_off_and_max_ratio():
    _, sel = _mine(SelectConfig(top_k=3, margin=None))
    assert [t for t, _ in _kept(sel, 0)] == ["just above the margin", "just below the margin", "second"]
    assert sel.filtered["false_negative"] == 0
    _, sel = _mine(SelectConfig(top_k=3, margin=0.05, max_ratio=0.9))  # also sim > 0.72 for turn 0
    assert [t for t, _ in _kept(sel, 0)] == ["second", "third", "fourth"]
    # 0.751 and 0.749 of turn 0; in turn 1 (0.9 * 0.95 = 0.855) only the near-duplicate 0.88 lies above
    assert sel.filtered["false_negative"] == 2


def test_fewer_than_top_k_and_summary():
    pos_sim, sel = _mine(SelectConfig(top_k=8, margin=0.05, extra=100))
    assert int(sel.kept[0]) == 5 and torch.isnan(sel.sims[0, 5:]).all() and (sel.indices[0, 5:] == -1).all()
    assert _kept(sel, 0)[-1] == ("far away", -0.5)
    s = summarize(pos_sim, sel.sims, sel.filtered, top_k=8)
    assert s["query_turns"] == 2 and s["turns_short"] == 2 and s["negatives_kept"] == int(sel.kept.sum())
    assert s["mean_pos_sim"] == pytest.approx(0.875)
    kept = torch.cat([sel.sims[r, : int(sel.kept[r])] for r in range(2)])
    assert s["mean_neg_sim_by_rank"]["1-10"] == pytest.approx(float(kept.mean()), abs=1e-6)
    assert s["mean_neg_sim_by_rank"]["11-30"] is None and s["filtered"] == sel.filtered


def test_rank_bands():
    sims = torch.full((2, 120), float("nan"))
    sims[0, :] = torch.arange(120, dtype=torch.float32)  # rank r has sim r - 1
    sims[1, :20] = 1000.0
    s = summarize(torch.zeros(2), sims, {}, top_k=120)
    bands = s["mean_neg_sim_by_rank"]
    assert bands["1-10"] == pytest.approx((45 + 10 * 1000) / 20)
    assert bands["11-30"] == pytest.approx((sum(range(10, 30)) + 10 * 1000) / 30)
    assert bands["31-100"] == pytest.approx(sum(range(30, 100)) / 70)
    assert bands[">100"] == pytest.approx(sum(range(100, 120)) / 20)
    assert s["turns_short"] == 1


def test_select_direct_and_search_depth():
    cfg = SelectConfig(top_k=2, margin=0.0)
    assert cfg.search_k(7) == 2 + 7 + 4 and SelectConfig(top_k=2, extra=0).search_k(3) == 5
    cand_idx = torch.tensor([[3, 0, 2, 1]])
    cand_sim = torch.tensor([[0.9, 0.5, 0.5, 0.1]])
    sel = select_negatives(cand_idx, cand_sim, torch.tensor([0]), torch.tensor([0.5]), torch.tensor([[0, -1]]),
                           torch.arange(4), cfg)
    # 0.9 > 0.5 - 0: false negative; the positive; 0.5 == pos - margin is not above it: kept
    assert sel.indices.tolist() == [[2, 1]] and sel.filtered["false_negative"] == 1
    with pytest.raises(ValueError):
        SelectConfig(top_k=0)


def test_normalize_text():
    assert normalize_text("  The   Positive!\n") == "the positive" == normalize_text("the positive")
    assert normalize_text("«Hello, world.»") == "hello, world"
    assert normalize_text("...") == "..." and normalize_text("ǅ") == "ǆ"
    assert normalized_ids(["A b.", "a  B", "c"]).tolist() == [0, 0, 1]
