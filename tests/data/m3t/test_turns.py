from __future__ import annotations

import os
import subprocess
import sys
from collections import Counter

import pytest

from muco.data.m3t.records import Turn
from muco.data.m3t.turns import draw_turns
from muco.data.seeds import sample_rng


def _turns(n: int = 7, cands: int = 3) -> list[Turn]:
    return [Turn(f"t{i}", [f"q{i}.{j}" for j in range(cands)], f"a{i}") for i in range(n)]


def test_queries_and_targets_share_the_permutation():
    turns = _turns()
    for key in range(50):
        q, t = draw_turns(turns, 7, sample_rng(0, 0, f"k{key}"))
        assert len(q) == len(t) == 7
        # turn k of the query side pairs with turn k of the target side
        assert [x.split(".")[0][1:] for x in q] == [y[1:] for y in t]
        assert sorted(t) == [f"a{i}" for i in range(7)]  # a permutation: every turn exactly once


def test_subset_of_size_k_without_repeats():
    turns = _turns()
    firsts = Counter()
    for key in range(700):
        q, t = draw_turns(turns, 4, sample_rng(1, 0, str(key)))
        assert len(set(t)) == 4
        firsts[t[0]] += 1
    # every turn can come first (the image goes in front of it), roughly uniformly: 100 expected each
    assert set(firsts) == {f"a{i}" for i in range(7)}
    assert min(firsts.values()) > 60 and max(firsts.values()) < 140


def test_candidates_drawn_uniformly():
    turns = _turns(n=1, cands=4)
    seen = Counter(draw_turns(turns, 1, sample_rng(0, e, "k"))[0][0] for e in range(800))
    assert set(seen) == {f"q0.{j}" for j in range(4)}
    assert min(seen.values()) > 140  # 200 expected each


def test_dict_turns_are_accepted():
    q, t = draw_turns([{"queries": ["x"], "target": "y"}], 1, sample_rng(0, 0, "k"))
    assert (q, t) == (["x"], ["y"])


def test_rng_depends_on_seed_epoch_and_key_only():
    turns = _turns()
    a = draw_turns(turns, 7, sample_rng(3, 2, "key"))
    assert draw_turns(turns, 7, sample_rng(3, 2, "key")) == a
    variants = [(4, 2, "key"), (3, 3, "key"), (3, 2, "kez")]
    others = [draw_turns(turns, 7, sample_rng(*args)) for args in variants]
    assert all(o != a for o in others)


def test_rng_is_stable_across_processes():
    code = "from muco.data.seeds import sample_rng; print(sample_rng(7, 1, 'abc').random())"
    outs = {
        subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                       env={**os.environ, "PYTHONHASHSEED": str(h)}).stdout
        for h in (1, 2)
    }
    assert outs == {f"{sample_rng(7, 1, 'abc').random()}\n"}


def test_too_many_turns_raises():
    with pytest.raises(ValueError, match="cannot draw 8 turns"):
        draw_turns(_turns(), 8, sample_rng(0, 0, "k"))
    with pytest.raises(ValueError):
        draw_turns(_turns(), 0, sample_rng(0, 0, "k"))


def test_indexed_draw_gives_the_stored_turn_of_each_drawn_turn():
    from muco.data.m3t.turns import draw_turns_indexed

    turns = _turns()
    for key in range(30):
        for shuffle in (True, False):
            q, t, idx = draw_turns_indexed(turns, 4, sample_rng(0, 0, f"k{key}"), shuffle=shuffle)
            # the same RNG use as draw_turns: identical draws, plus where each came from
            assert (q, t) == draw_turns(turns, 4, sample_rng(0, 0, f"k{key}"), shuffle=shuffle)
            assert t == [f"a{i}" for i in idx] and len(set(idx)) == 4
            assert idx == sorted(idx) or shuffle


def test_batch_turn_order_permutes_turn_indices_and_negatives_alike():
    from muco.data.m3t.collate import PretrainSample
    from muco.data.m3t.decode import BatchTurnOrder
    from muco.data.stream import ShardStream, StreamConfig

    cfg = StreamConfig(sources=[["x.tar"]], batch_size=3)
    # only the batch order is used: no decoder, no collator
    stream = ShardStream(cfg, decode=None, collate=None, arrange=BatchTurnOrder(4))  # type: ignore[arg-type]
    buf = [PretrainSample(f"s{i}", None, [f"q{i}.{j}" for j in (0, 2, 3, 6)], [f"a{i}.{j}" for j in (0, 2, 3, 6)],
                          turns=[0, 2, 3, 6], negatives=[[f"n{i}.{j}.{d}" for j in (0, 2, 3, 6)] for d in range(2)])
           for i in range(3)]
    orders = set()
    for _ in range(6):
        for s in stream._batch_order(buf, epoch=0, wid="r0w0"):
            for k, turn in enumerate(s.turns):
                assert s.queries[k].endswith(f".{turn}") and s.targets[k].endswith(f".{turn}")
                assert [d[k] for d in s.negatives] == [f"n{s.key[1:]}.{turn}.{d}" for d in range(2)]
        assert len({tuple(s.turns) for s in buf}) == 1  # one order for the whole batch
        orders.add(tuple(buf[0].turns))
    assert len(orders) > 1
