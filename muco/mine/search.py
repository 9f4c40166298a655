"""Exact top-k cosine search in chunks: never an ``nq x nc`` score matrix, corpus moved chunk by chunk.

Embeddings are L2-normalised, so cosine = dot product. Scores are computed in fp32 on ``device`` (CPU or
CUDA); the corpus may stay in CPU memory and travel one ``corpus_chunk`` at a time (put it on the device first
when it fits: then nothing is copied per chunk). Peak extra memory is ``query_chunk x (corpus_chunk + k)``
scores.
"""

from __future__ import annotations

import torch
from torch import Tensor


def chunked_topk(
    queries: Tensor,
    corpus: Tensor,
    k: int,
    query_chunk: int = 1024,
    corpus_chunk: int = 16384,
    device: str | torch.device | None = None,
) -> tuple[Tensor, Tensor]:
    """The ``k`` highest ``queries @ corpus.T`` scores per query, best first.

    Returns ``(scores [nq, k'] fp32, indices [nq, k'] int64)`` on the CPU with ``k' = min(k, nc)``. Each query
    chunk keeps a running top-k that is merged with every corpus chunk's own top-k (``torch.topk`` over the
    concatenation), which gives the exact result for any chunk sizes, ``k`` larger than a chunk included.
    """
    if queries.dim() != 2 or corpus.dim() != 2 or queries.shape[1] != corpus.shape[1]:
        raise ValueError(f"need queries [nq, d] and corpus [nc, d], got {tuple(queries.shape)} and "
                         f"{tuple(corpus.shape)}")
    if k < 1 or query_chunk < 1 or corpus_chunk < 1:
        raise ValueError(f"k, query_chunk and corpus_chunk must be >= 1, got {k}, {query_chunk}, {corpus_chunk}")
    nq, nc = queries.shape[0], corpus.shape[0]
    k = min(k, nc)
    device = torch.device(device) if device is not None else queries.device
    out_s = torch.empty(nq, k, dtype=torch.float32)
    out_i = torch.empty(nq, k, dtype=torch.long)
    if nq == 0 or k == 0:
        return out_s, out_i
    with torch.no_grad():
        for qs in range(0, nq, query_chunk):
            q = queries[qs : qs + query_chunk].to(device=device, dtype=torch.float32)
            best_s: Tensor | None = None
            best_i: Tensor | None = None
            for cs in range(0, nc, corpus_chunk):
                c = corpus[cs : cs + corpus_chunk].to(device=device, dtype=torch.float32, non_blocking=True)
                s, i = (q @ c.T).topk(min(k, c.shape[0]), dim=1)
                i += cs
                if best_s is None:
                    best_s, best_i = s, i
                    continue
                cat_s, cat_i = torch.cat([best_s, s], 1), torch.cat([best_i, i], 1)
                best_s, pos = cat_s.topk(min(k, cat_s.shape[1]), dim=1)
                best_i = cat_i.gather(1, pos)
            out_s[qs : qs + q.shape[0]] = best_s.cpu()
            out_i[qs : qs + q.shape[0]] = best_i.cpu()
    return out_s, out_i
