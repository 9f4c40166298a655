"""Ranking metrics over per-query candidate lists, through torchmetrics' retrieval metrics.

Every query has its own candidate list (lists differ in length), so scores are flattened and grouped by a
query index. A candidate counts as relevant when its name equals the gold name (the first candidate); a gold
label listed twice is therefore relevant twice, which leaves Precision@1 as in the released harness.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torchmetrics import MetricCollection
from torchmetrics.retrieval import RetrievalHitRate, RetrievalMRR, RetrievalNormalizedDCG, RetrievalPrecision

PRIMARY = "precision@1"  # MMEB's metric (= hit@1 with one gold)


def _collection() -> MetricCollection:
    # sync_on_compute=False: every process holds all queries (multi-device eval gathers the embeddings, and
    # validation in fit runs the same tasks on every rank); torchmetrics' default would gather them again and
    # merge each query with its copies from the other ranks
    local = {"sync_on_compute": False}
    return MetricCollection({
        "precision@1": RetrievalPrecision(top_k=1, **local),
        "hit@5": RetrievalHitRate(top_k=5, **local),
        "mrr": RetrievalMRR(**local),
        "ndcg@10": RetrievalNormalizedDCG(top_k=10, **local),
    })


def ranking_metrics(scores: Sequence[torch.Tensor], relevant: Sequence[torch.Tensor]) -> dict[str, float]:
    """Mean metrics over queries; ``scores[i]`` / ``relevant[i]``: query i's candidate scores / gold mask."""
    if len(scores) != len(relevant) or not scores:
        raise ValueError(f"need one relevance mask per query: {len(scores)} scores, {len(relevant)} masks")
    for i, (s, r) in enumerate(zip(scores, relevant)):
        if s.shape != r.shape or s.ndim != 1:
            raise ValueError(f"query {i}: scores {tuple(s.shape)} vs relevance {tuple(r.shape)}")
    preds = torch.cat([s.float().cpu() for s in scores])
    target = torch.cat([r.bool().cpu() for r in relevant])
    lengths = torch.tensor([len(s) for s in scores])
    indexes = torch.repeat_interleave(torch.arange(len(scores)), lengths)
    metrics = _collection()
    metrics.update(preds, target, indexes=indexes)
    return {k: float(v) for k, v in metrics.compute().items()}


def gold_rank(scores: torch.Tensor, relevant: torch.Tensor) -> int:
    """1-based rank of the best-scored relevant candidate (ties counted in its favour)."""
    best = scores[relevant].max()
    return int((scores[~relevant] > best).sum()) + 1
