"""Which of a query turn's nearest target texts are kept as hard negatives, and their ranks.

A candidate is dropped, checked in this order (the first reason that applies is counted):

- ``positive``: it is the query turn's own target text;
- ``same_sample``: it is another target of the same sample (another turn of the query's own image);
- ``near_duplicate``: it equals the positive (or another target of the same sample) after
  :func:`normalize_text` (casefold, whitespace collapsed, surrounding punctuation and whitespace stripped);
- ``false_negative``: it is likely a false negative: ``sim > pos_sim - margin`` (``margin`` None: off), or
  ``sim > max_ratio * pos_sim`` (off unless ``max_ratio`` is set).

Ranks are 1-based among the KEPT candidates, so rank 1 is the hardest negative that survived the filters. Counts
are taken over the candidates scanned until ``top_k`` were kept (all candidates when fewer survive), so they do
not depend on how many extra candidates the search returned.
"""

from __future__ import annotations

import unicodedata
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from muco.mine.dist import world
from muco.mine.ring import ring_search
from muco.mine.search import Shard

REASONS = ("positive", "same_sample", "near_duplicate", "false_negative")


def normalize_text(text: str) -> str:
    """The near-duplicate form: casefolded, whitespace runs collapsed to one space, surrounding punctuation and
    whitespace stripped. A text made only of punctuation keeps its punctuation (else all such texts would
    collide on the empty string)."""
    s = " ".join(text.casefold().split())
    lo, hi = 0, len(s)
    while lo < hi and (s[lo].isspace() or unicodedata.category(s[lo]).startswith("P")):
        lo += 1
    while hi > lo and (s[hi - 1].isspace() or unicodedata.category(s[hi - 1]).startswith("P")):
        hi -= 1
    return s[lo:hi] or s


def normalized_ids(texts: Sequence[str]) -> Tensor:
    """``[n]`` int64: equal ids for texts with equal :func:`normalize_text` forms (first-seen numbering)."""
    ids: dict[str, int] = {}
    return torch.tensor([ids.setdefault(normalize_text(t), len(ids)) for t in texts], dtype=torch.long)


@dataclass(frozen=True)
class SelectConfig:
    top_k: int = 100
    margin: float | None = 0.05
    max_ratio: float | None = None
    extra: int | None = None  # extra candidates searched beyond top_k + turns; None: 2 * top_k

    def __post_init__(self) -> None:
        if self.top_k < 1:
            raise ValueError(f"top_k must be >= 1, got {self.top_k}")
        if self.extra is not None and self.extra < 0:
            raise ValueError(f"extra must be >= 0, got {self.extra}")

    def search_k(self, turns_per_sample: int) -> int:
        """Candidates to search: the positive and the sample's other targets may take ``turns_per_sample``
        slots, near-duplicates and false negatives some of the ``extra``."""
        extra = 2 * self.top_k if self.extra is None else self.extra
        return self.top_k + turns_per_sample + extra


@dataclass
class Selection:
    """Kept negatives per query turn: ``indices`` [nq, top_k] (corpus rows, -1 past the kept ones), ``sims``
    [nq, top_k] fp32 (NaN past the kept ones), ``kept`` [nq]; ``filtered`` counts per reason."""

    indices: Tensor
    sims: Tensor
    kept: Tensor
    filtered: dict[str, int]

    @staticmethod
    def cat(parts: Sequence[Selection]) -> Selection:
        return Selection(torch.cat([p.indices for p in parts]), torch.cat([p.sims for p in parts]),
                         torch.cat([p.kept for p in parts]),
                         {r: sum(p.filtered[r] for p in parts) for r in REASONS})


def select_negatives(
    cand_idx: Tensor, cand_sim: Tensor, pos_idx: Tensor, pos_sim: Tensor, same_idx: Tensor, norm_id: Tensor,
    cfg: SelectConfig,
) -> Selection:
    """Filter each query's candidates (best first) and keep up to ``cfg.top_k``.

    ``cand_idx``/``cand_sim`` [nq, k'] from the search, best first (its tie rule: equal similarities, lower
    corpus row first); ``pos_idx``/``pos_sim`` [nq] the positive's corpus row
    and similarity; ``same_idx`` [nq, T] the corpus rows of the query's sample's targets (-1 padded);
    ``norm_id`` [nc] the :func:`normalized_ids` of the corpus.
    """
    nq = cand_idx.shape[0]
    is_pos = cand_idx == pos_idx[:, None]
    same = (cand_idx[:, :, None] == same_idx[:, None, :]).any(-1) & ~is_pos
    cand_norm = norm_id[cand_idx]
    same_norm = torch.where(same_idx >= 0, norm_id[same_idx.clamp(min=0)], -1)
    near = (cand_norm == norm_id[pos_idx][:, None]) | (cand_norm[:, :, None] == same_norm[:, None, :]).any(-1)
    near &= ~is_pos & ~same
    false_neg = torch.zeros_like(is_pos)
    if cfg.margin is not None:
        false_neg |= cand_sim > (pos_sim - cfg.margin)[:, None]
    if cfg.max_ratio is not None:
        false_neg |= cand_sim > (cfg.max_ratio * pos_sim)[:, None]
    false_neg &= ~is_pos & ~same & ~near
    keep = ~(is_pos | same | near | false_neg)
    rank = keep.long().cumsum(1)  # 1-based rank of each kept candidate
    take = keep & (rank <= cfg.top_k)
    # candidates scanned: everything up to (and including) the top_k-th kept one
    scanned = (rank - keep.long()) < cfg.top_k
    filtered = {name: int((m & scanned).sum()) for name, m in zip(REASONS, (is_pos, same, near, false_neg))}

    indices = torch.full((nq, cfg.top_k), -1, dtype=torch.long)
    sims = torch.full((nq, cfg.top_k), float("nan"), dtype=torch.float32)
    rows, cols = take.nonzero(as_tuple=True)
    slots = rank[rows, cols] - 1
    indices[rows, slots] = cand_idx[rows, cols]
    sims[rows, slots] = cand_sim[rows, cols].float()
    return Selection(indices, sims, take.sum(1), filtered)


def mine_negatives(
    queries: Tensor, corpus: Tensor | Shard, pos_idx: Tensor, same_idx: Tensor, norm_id: Tensor, cfg: SelectConfig,
    query_chunk: int = 1024, corpus_chunk: int = 16384, device: str | torch.device | None = None,
) -> tuple[Tensor, Selection]:
    """Search and select for every query turn, one block of ``query_chunk`` turns at a time (bounded memory).

    ``corpus``: the whole corpus [nc, d] in one process; in a process group this rank's :class:`Shard` (every
    rank must call this: the query blocks travel a ring, :func:`~muco.mine.ring.ring_search`). ``pos_idx``,
    ``same_idx`` and ``norm_id`` use global corpus rows. Returns ``(pos_sim [nq], selection)``; ``same_idx``
    [nq, T] fixes the turns per sample used for the search depth (:meth:`SelectConfig.search_k`).
    """
    if not isinstance(corpus, Shard) and world()[1] > 1:
        raise ValueError("in a process group, mine_negatives needs this rank's Shard (its rows' global indices)")
    shard = corpus if isinstance(corpus, Shard) else Shard(corpus)
    k = cfg.search_k(same_idx.shape[1])
    pos_sim = torch.empty(queries.shape[0], dtype=torch.float32)
    parts = []
    for res in ring_search(queries, pos_idx, shard, k, query_chunk, corpus_chunk, device):
        if res.rows.stop == res.rows.start:
            continue
        pos_sim[res.rows] = res.pos_sim
        parts.append(select_negatives(res.indices, res.scores, pos_idx[res.rows], res.pos_sim, same_idx[res.rows],
                                      norm_id, cfg))
    if not parts:
        empty = torch.empty(0, cfg.top_k)
        return pos_sim, Selection(empty.long(), empty, torch.empty(0, dtype=torch.long),
                                  dict.fromkeys(REASONS, 0))
    return pos_sim, Selection.cat(parts)
