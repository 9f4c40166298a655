from __future__ import annotations

import os
import subprocess
import sys
from collections import Counter

import pytest

from muco.data.records import Turn
from muco.data.turns import draw_turns, sample_rng


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
    code = "from muco.data.turns import sample_rng; print(sample_rng(7, 1, 'abc').random())"
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
