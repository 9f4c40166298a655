import random

import pytest

from muco.data.pairs.masking import MaskingConfig, counterpart_text, mask_words

M = "<|mask|>"


class ScriptedRandom(random.Random):
    """Returns a fixed sequence of draws, so the expected string can be derived by hand."""

    def __init__(self, draws):
        super().__init__(0)
        self.draws = list(draws)

    def random(self):
        return self.draws.pop(0)


def test_hand_derived_word_masking():
    # full-mask coin 0.9 >= 0.5 -> word masking; words: a b c d e ; coins mask a? no(0.7) b? yes c? yes d? no e? yes
    rng = ScriptedRandom([0.9, 0.7, 0.1, 0.2, 0.8, 0.3])
    assert mask_words("a b c d e", rng) == f"a {M} d {M}"


def test_runs_not_collapsed_when_disabled():
    rng = ScriptedRandom([0.9, 0.7, 0.1, 0.2, 0.8, 0.3])
    cfg = MaskingConfig(collapse_runs=False)
    assert mask_words("a b c d e", rng, cfg) == f"a {M} {M} d {M}"


def test_full_mask_branch():
    assert mask_words("anything at all", ScriptedRandom([0.1])) == M
    # paper mode: no full-mask branch
    rng = ScriptedRandom([0.0, 0.9, 0.9])  # the coin is still drawn: streams stay aligned
    assert mask_words("x y", rng, MaskingConfig(full_mask_prob=0.0)) == "x y"


def test_seeded_masking_is_reproducible_and_near_ratio():
    text = " ".join(f"w{i}" for i in range(2000))
    cfg = MaskingConfig(full_mask_prob=0.0, collapse_runs=False)
    a = mask_words(text, random.Random(7), cfg)
    assert a == mask_words(text, random.Random(7), cfg)
    frac = a.split(" ").count(M) / 2000
    assert 0.45 < frac < 0.55


def test_counterpart_replaces_image_by_caption():
    assert counterpart_text("what is it", "a red bus", True) == "Image description: a red bus\nwhat is it\n"
    assert counterpart_text("plain\n", None, False) == "plain\n"
    with pytest.raises(ValueError, match="caption"):
        counterpart_text("q", "", True)
