"""Exact top-k over a corpus sharded across processes: every rank keeps only its own corpus rows and the query
blocks travel around a ring.

Round ``t``: every rank takes block ``t`` of its own queries (at most ``block`` rows; empty when it has fewer
blocks than the others) with an empty running top-k, searches its own shard, then passes the block (queries,
positives' indices, running top-k and positive scores) to rank ``r + 1`` and receives the block of rank
``r - 1``; after ``W`` searches every block has met every shard and one more pass brings it home. The running
top-k is merged exactly at each shard (:func:`muco.mine.search.search_shard`: exact scores, higher score first,
then lower global index), so the result equals the single-process top-k over the whole corpus for any ``W``.
A block's positive score is computed on the rank that holds the positive's row, during the same pass.

Memory per rank: its shard (``n / W`` rows) plus one block in flight (sent and received:
``2 x block x (d + 2k + 2)`` values), whatever ``W``; per round each rank sends ``W`` messages of one block.
In a single process (torch.distributed not initialised) it is the plain chunked search.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import Tensor

from muco.mine.dist import all_reduce_ints, backend_device, world
from muco.mine.search import Shard, empty_topk, positive_scores, search_shard


@dataclass
class BlockResult:
    """This rank's query rows ``rows`` and their exact top-k: ``scores`` [b, k'] fp32 and ``indices`` [b, k']
    global corpus rows in rule order (``k' = min(k, corpus size)``), ``pos_sim`` [b] (CPU tensors)."""

    rows: slice
    scores: Tensor
    indices: Tensor
    pos_sim: Tensor


def _pass_on(tensors: list[Tensor]) -> list[Tensor]:
    """Send ``tensors`` to the next rank and receive the previous rank's (same shapes and dtypes)."""
    rank, size = world()
    nxt, prev = (rank + 1) % size, (rank - 1) % size
    dev = backend_device()
    sent = [t.to(dev).contiguous() for t in tensors]
    got = [torch.empty_like(t) for t in sent]
    ops = [dist.P2POp(dist.isend, t, nxt, tag=j) for j, t in enumerate(sent)]
    ops += [dist.P2POp(dist.irecv, t, prev, tag=j) for j, t in enumerate(got)]
    for req in dist.batch_isend_irecv(ops):
        req.wait()
    return got


def ring_search(queries: Tensor, pos_idx: Tensor, shard: Shard, k: int, block: int = 1024,
                corpus_chunk: int = 16384, device: str | torch.device | None = None,
                dtype: torch.dtype | None = None) -> Iterator[BlockResult]:
    """Exact top-k of this rank's ``queries`` [nq, d] over every rank's ``shard`` (global corpus indices),
    and the score of each query with its positive ``pos_idx`` [nq] (a global corpus row), block by block.

    A collective: every rank must iterate it to the end (ranks with fewer queries take part with empty blocks).
    ``dtype``: the candidate matmuls' (default bf16 on CUDA, fp32 elsewhere); it does not change the result.
    """
    if queries.dim() != 2 or queries.shape[1] != shard.dim or pos_idx.shape != (queries.shape[0],):
        raise ValueError(f"need queries [nq, {shard.dim}] and pos_idx [nq], got {tuple(queries.shape)} and "
                         f"{tuple(pos_idx.shape)}")
    if k < 1 or block < 1:
        raise ValueError(f"k and block must be >= 1, got {k} and {block}")
    _, size = world()
    device = torch.device(device) if device is not None else queries.device
    nq, d = queries.shape
    total = all_reduce_ints([len(shard)])[0]
    # checked on every rank at once: a rank that stopped alone would leave the others waiting in the ring
    bad = bool(((pos_idx < 0) | (pos_idx >= total)).any()) or not bool(torch.isfinite(queries).all())
    rounds, bad_anywhere = all_reduce_ints([-(-nq // block), int(bad)], "max")
    if bad_anywhere:
        raise ValueError(f"queries must be finite and positives corpus rows in [0, {total}) on every rank")
    k = min(k, total)  # k' = min(k, corpus size), the same on every rank
    with torch.no_grad():
        for t in range(rounds):
            rows = slice(min(t * block, nq), min((t + 1) * block, nq))
            n = rows.stop - rows.start
            q = torch.zeros(block, d, device=device)
            q[:n] = queries[rows].to(device=device, dtype=torch.float32)
            pos = torch.full((block,), -1, dtype=torch.long, device=device)  # -1: no query in this row
            pos[:n] = pos_idx[rows].to(device)
            best_s, best_i = empty_topk(block, k, device)
            pos_sim = torch.full((block,), float("nan"), device=device)
            for hop in range(size):
                if hop:
                    q, pos, best_s, best_i, pos_sim = (x.to(device) for x in _pass_on([q, pos, best_s, best_i,
                                                                                       pos_sim]))
                m = int((pos >= 0).sum())  # the rows of the block in hand (a prefix)
                best_s[:m], best_i[:m] = search_shard(q[:m], shard, best_s[:m], best_i[:m], corpus_chunk, dtype)
                positive_scores(q[:m], pos[:m], shard, pos_sim[:m])
            if size > 1:  # home: this rank holds the block of rank r + 1 now
                best_s, best_i, pos_sim = (x.to(device) for x in _pass_on([best_s, best_i, pos_sim]))
            yield BlockResult(rows, best_s[:n].cpu(), best_i[:n].cpu(), pos_sim[:n].cpu())
