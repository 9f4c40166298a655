"""Statistics of a mining run: positive and negative similarities, filter counts, short turns."""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import Tensor

BANDS = ((1, 10), (11, 30), (31, 100), (101, None))


def band_name(lo: int, hi: int | None) -> str:
    return f">{lo - 1}" if hi is None else f"{lo}-{hi}"


def _mean(x: Tensor) -> float | None:
    return round(float(x.double().mean()), 6) if x.numel() else None


def summarize(pos_sim: Tensor, sims: Tensor, filtered: Mapping[str, int], top_k: int) -> dict:
    """``pos_sim`` [nq]; ``sims`` [nq, top_k] with NaN past each turn's kept negatives (rank r in column r-1).

    Returns the mean positive similarity, the mean negative similarity per rank band (1-10, 11-30, 31-100,
    >100; None for an empty band), the counts filtered per reason, the number of query turns mined and the
    number that kept fewer than ``top_k`` negatives.
    """
    kept = ~torch.isnan(sims)
    bands = {}
    for lo, hi in BANDS:
        cols = sims[:, lo - 1 : hi]
        bands[band_name(lo, hi)] = _mean(cols[kept[:, lo - 1 : hi]])
    n_kept = kept.sum(1)
    return {
        "query_turns": int(pos_sim.numel()),
        "mean_pos_sim": _mean(pos_sim),
        "mean_neg_sim": _mean(sims[kept]),
        "mean_neg_sim_by_rank": bands,
        "filtered": {k: int(v) for k, v in filtered.items()},
        "negatives_kept": int(n_kept.sum()),
        "turns_short": int((n_kept < top_k).sum()),
        "turns_without_negatives": int((n_kept == 0).sum()),
    }
