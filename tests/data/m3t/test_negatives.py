"""Mined-negative sampling (rank band, seeded draws, missing negatives) and the per-round difficulty schedule."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass

import pytest

from muco.data.m3t.negatives import NegativeSampler, NegativesConfig, negative_rng
from muco.inputs.sequence import BadSampleError
from muco.rounds.schedule import DifficultySchedule


@dataclass
class Neg:  # the reader's item: text, rank (1 = hardest kept), similarity
    text: str
    rank: int
    sim: float


def mined(keys=("a", "b"), turns=range(7), top_k=20) -> dict:
    return {(k, t): [Neg(f"{k}/{t}/{r}", r, 1 - r / 100) for r in range(1, top_k + 1)] for k in keys for t in turns}


def rank_of(text: str) -> tuple[str, int, int]:
    k, t, r = text.split("/")
    return k, int(t), int(r)


def test_draws_come_only_from_the_band_of_their_own_turn():
    sampler = NegativeSampler.from_mined(mined(), band=(5, 8), per_turn=2)
    seen = Counter()
    for epoch in range(200):
        turns = [6, 0, 3]
        draws = sampler.draw("a", turns, negative_rng(0, epoch, "a"))
        assert len(draws) == 2 and all(len(d) == 3 for d in draws)
        for k, turn in enumerate(turns):
            pair = [rank_of(d[k]) for d in draws]
            assert all(key == "a" and t == turn and 5 <= r <= 8 for key, t, r in pair)
            assert pair[0] != pair[1]  # without replacement within a turn
            seen.update(r for _, _, r in pair)
    assert set(seen) == {5, 6, 7, 8}  # the whole band, roughly uniformly (300 expected each)
    assert min(seen.values()) > 220


def test_draws_are_seeded_by_seed_epoch_and_key():
    sampler = NegativeSampler.from_mined(mined(), band=(1, 20), per_turn=1)
    a = sampler.draw_seeded("a", [0, 1, 2, 3], seed=3, epoch=1)
    assert sampler.draw_seeded("a", [0, 1, 2, 3], seed=3, epoch=1) == a  # reproducible / resumable
    assert sampler.draw("a", [0, 1, 2, 3], negative_rng(3, 1, "a")) == a
    for other in [(4, 1), (3, 2)]:
        assert sampler.draw_seeded("a", [0, 1, 2, 3], *other) != a


def test_short_band_and_missing_negatives():
    table = mined(keys=("a",), turns=[0, 1], top_k=2)
    table[("a", 1)] = table[("a", 1)][:1]
    sampler = NegativeSampler.from_mined(table, band=(2, 10), per_turn=2)
    draws = sampler.draw("a", [0, 1, 5], negative_rng(0, 0, "a"))
    # turn 0: one negative in ranks 2..10 (rank 2), so the second draw is missing; turn 1 has only rank 1;
    # turn 5 has no mined list at all
    assert draws[0][0] == "a/0/2" and draws[1][0] is None  # what there is comes first
    assert [d[1] for d in draws] == [None, None] and [d[2] for d in draws] == [None, None]
    assert sampler.draw("zzz", [0, 1], negative_rng(0, 0, "zzz")) == [[None, None], [None, None]]
    assert len(sampler) == 1 and sampler.num_turns() == 1  # only (a, 0) has a negative in the band


def test_reserved_strings_in_a_mined_text_fail_the_sample():
    sampler = NegativeSampler.from_mined({("a", 0): [Neg("bad <|emb|> text", 1, 0.5)]}, band=(1, 1))
    with pytest.raises(BadSampleError, match=r"'a'.*<\|emb\|>"):
        sampler.draw_seeded("a", [0], 0, 0)


def test_config_coercion_and_errors():
    cfg = NegativesConfig.coerce({"sidecar": "runs/x/mined", "band": [3, 7], "per_turn": 2})
    assert cfg == NegativesConfig("runs/x/mined", (3, 7), 2)
    assert NegativesConfig.coerce(None) is None and NegativesConfig.coerce(cfg) is cfg
    assert NegativesConfig("s").band == (1, 10) and NegativesConfig("s").per_turn == 1
    with pytest.raises(ValueError, match="band must be"):
        NegativesConfig("s", band=(5, 2))
    with pytest.raises(ValueError, match="band must be"):
        NegativesConfig("s", band=(0, 2))
    with pytest.raises(ValueError, match="per_turn"):
        NegativesConfig("s", per_turn=0)
    with pytest.raises(ValueError, match="unknown keys.*'bands'"):
        NegativesConfig.coerce({"sidecar": "s", "bands": [1, 2]})
    with pytest.raises(ValueError, match="needs a sidecar"):
        NegativesConfig.coerce({"band": [1, 2]})


ISSUE_SCHEDULE = [{"from_round": 2, "band": [30, 100]}, {"from_round": 3, "band": [5, 30]},
                  {"from_round": 4, "band": [1, 10], "per_turn": 2}]


def test_schedule_gives_the_configured_band_per_round():
    s = DifficultySchedule(ISSUE_SCHEDULE)
    assert s.at(1) is None  # round 1: in-batch negatives only
    assert s.at(2) == ((30, 100), 1)
    assert s.at(3) == ((5, 30), 1)
    assert s.at(4) == s.at(9) == ((1, 10), 2)
    assert DifficultySchedule.coerce({"stages": ISSUE_SCHEDULE}).to_list() == s.to_list()
    assert DifficultySchedule.coerce(None).at(5) is None
    assert s.negatives_for(1, None) is None
    assert s.negatives_for(3, "runs/r2/mined") == NegativesConfig("runs/r2/mined", (5, 30), 1)
    with pytest.raises(ValueError, match="no sidecar"):
        s.negatives_for(2, None)


@pytest.mark.parametrize("stages, match", [
    ([{"from_round": 2, "band": [1, 5]}, {"from_round": 2, "band": [1, 3]}], "greater than the previous"),
    ([{"from_round": 0, "band": [1, 5]}], "from_round must be an integer >= 1"),
    ([{"from_round": 2, "band": [9, 5]}], "stage 0: band must be"),
    ([{"from_round": 2, "band": [1, 5], "per_turn": 0}], "per_turn"),
    ([{"from_round": 2, "bands": [1, 5]}], r"unknown keys \['bands'\], missing keys \['band'\]"),
])
def test_schedule_errors(stages, match):
    with pytest.raises(ValueError, match=match):
        DifficultySchedule(stages)


def test_schedule_rounds_count_from_one():
    with pytest.raises(ValueError, match="count from 1"):
        DifficultySchedule(ISSUE_SCHEDULE).at(0)
