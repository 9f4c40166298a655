"""The sharded search in W real processes (gloo, CPU): each rank holds a strided share of the corpus and an
uneven share of the queries, runs ``ring_search`` and saves its results; ``tests/mine/test_ring.py`` compares
them with the single-process search over the whole corpus.

Run as ``python tests/mine/_ring_check.py OUT_DIR W [W ...]``; writes ``OUT_DIR/w{W}_r{rank}.pt``.
"""

from __future__ import annotations

import os
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # run as a script: `tests` importable

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from muco.mine.ring import ring_search
from muco.mine.search import Shard
from tests.mine.test_search import tied_data

# (name, k, block, corpus_chunk, matmul dtype): blocks smaller than a rank's share (several rounds, a partial
# last block, ranks with fewer rounds); bf16 makes the exactness check retry often
SETTINGS = (("fp32", 40, 7, 13, torch.float32), ("bf16", 12, 16, 64, torch.bfloat16),
            ("deep", 150, 50, 29, torch.float32))


def case() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(queries, corpus, positives): the tied data of test_search and a random positive per query."""
    q, c = tied_data(seed=7)
    pos = torch.randint(0, len(c), (len(q),), generator=torch.Generator().manual_seed(7))
    return q, c, pos


def query_bounds(nq: int, world: int) -> list[int]:
    """Uneven shares: rank r gets about (r + 1)-proportional rows; the last rank may get none."""
    weights = [world - r for r in range(world)]
    cuts = [0]
    for w in weights:
        cuts.append(min(nq, cuts[-1] + -(-nq * w // sum(weights))))
    return cuts


def _worker(rank: int, world: int, init: str, out: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init}", rank=rank, world_size=world)
    try:
        q, c, pos = case()
        b = query_bounds(len(q), world)
        mine = slice(b[rank], b[rank + 1])
        shard = Shard(c[rank::world], rank, world)
        res = {}
        for name, k, block, chunk, dtype in SETTINGS:
            parts = list(ring_search(q[mine], pos[mine], shard, k, block, chunk, dtype=dtype))
            res[name] = tuple(torch.cat([getattr(p, f) for p in parts]) if parts else None
                              for f in ("scores", "indices", "pos_sim"))
            # one result per round of the busiest rank: this rank's blocks in order, then empty ones
            assert [p.rows.start for p in parts if p.rows.stop > p.rows.start] == list(
                range(0, mine.stop - mine.start, block))
        bad = pos[mine].clone()
        if rank == 0:
            bad[0] = len(c)  # not a corpus row: every rank must refuse, none may wait for it in the ring
        try:
            list(ring_search(q[mine], bad, shard, 5, 7, 13))
            res["refused"] = False
        except ValueError:
            res["refused"] = True
        torch.save(res, Path(out) / f"w{world}_r{rank}.pt")
    finally:
        dist.destroy_process_group()


def main(out: str, worlds: list[int]) -> None:
    for world in worlds:
        fd, init = tempfile.mkstemp(prefix="ring_init_")
        os.close(fd)
        os.unlink(init)  # the FileStore creates it
        try:
            # forked: the ranks start with torch and muco already imported (the parent computed nothing yet)
            mp.start_processes(_worker, args=(world, init, out), nprocs=world, join=True, start_method="fork")
        finally:
            if os.path.exists(init):
                os.unlink(init)


if __name__ == "__main__":
    main(sys.argv[1], [int(w) for w in sys.argv[2:]])
