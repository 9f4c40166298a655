"""The corpus sharded over 1, 2 and 3 real processes (gloo): every rank's exact top-k and positive scores equal
the single-process search over the whole corpus, ties at the k-th place included."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from muco.mine.ring import ring_search
from muco.mine.search import Shard, chunked_topk, pair_scores
from tests.mine._ring_check import SETTINGS, case, query_bounds
from tests.mine.test_search import brute_force

HELPER = Path(__file__).with_name("_ring_check.py")


@pytest.fixture(scope="module")
def ring_runs(tmp_path_factory) -> Path:
    """Each rank's saved results for 2 and 3 processes (about 10 s: the processes' start-up)."""
    out = tmp_path_factory.mktemp("ring")
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, str(HELPER), str(out), "2", "3"], capture_output=True, text=True,
                          timeout=300, env=env)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return out


def _single_process(name: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    q, c, pos = case()
    _, k, block, chunk, _ = next(s for s in SETTINGS if s[0] == name)
    s, i = chunked_topk(q, c, k, block, chunk)
    return s, i, pair_scores(q, c[pos][:, None])[:, 0]


def test_the_data_has_ties_at_the_kth_place():
    q, c, _ = case()
    for _, k, *_ in SETTINGS:
        s, _ = brute_force(q, c, k + 1)
        assert int((s[:, k - 1] == s[:, k]).sum()) >= 3
        assert torch.equal(brute_force(q, c, k)[1], chunked_topk(q, c, k)[1])


def test_one_process_ring_is_the_chunked_search():
    q, c, pos = case()
    for name, k, block, chunk, dtype in SETTINGS:
        parts = list(ring_search(q, pos, Shard(c), k, block, chunk, dtype=dtype))
        want = _single_process(name)
        for j, f in enumerate(("scores", "indices", "pos_sim")):
            assert torch.equal(torch.cat([getattr(p, f) for p in parts]), want[j]), (name, f)


def test_bad_inputs_are_refused():
    q, c, pos = case()
    for bad_q, bad_pos in ((q, pos - len(c)), (q, pos + len(c)), (q.clone().fill_(float("nan")), pos)):
        with pytest.raises(ValueError, match="finite and positives"):
            list(ring_search(bad_q, bad_pos, Shard(c), 5))


@pytest.mark.parametrize("world", [2, 3])
def test_sharded_ring_equals_the_whole_corpus(ring_runs, world):
    nq = len(case()[0])
    bounds = query_bounds(nq, world)
    assert len({bounds[r + 1] - bounds[r] for r in range(world)}) > 1  # uneven shares: ranks with fewer rounds
    ranks = [torch.load(ring_runs / f"w{world}_r{r}.pt") for r in range(world)]
    assert all(res.pop("refused") for res in ranks)  # one rank's bad positive: all ranks raise, none hangs
    for name, *_ in SETTINGS:
        want = _single_process(name)
        for j in range(3):
            got = torch.cat([res[name][j] for res in ranks if res[name][j] is not None])
            assert torch.equal(got, want[j]), (world, name, j)
