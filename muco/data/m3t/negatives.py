"""Mined hard negatives in pretraining: which rank band they are drawn from, per round, and the seeded sampler.

A mined-negatives sidecar (written by ``muco mine``, read by :func:`muco.data.m3t.sidecar.load_sidecar`) lists, for
each (sample key, stored turn index), the kept negatives ranked 1 = hardest. Training draws, for every drawn
turn of a sample, ``per_turn`` distinct negatives uniformly from the ranks ``band = [lo, hi]`` (inclusive) of
that turn's list. The draws come from their own RNG seeded by (global seed, epoch, sample key), so they are
reproducible and resumable, and switching negatives on does not change which turns and queries are drawn.

A turn with fewer than ``per_turn`` negatives in the band uses what it has; its remaining draws are *missing*
(``None``): the collator fills their slots with a placeholder turn that the loss masks.

The difficulty schedule (:class:`DifficultySchedule`) says, per training round, which band and how many
negatives per turn; round 1 usually has no stage (in-batch negatives only).
"""

from __future__ import annotations

import logging
import random
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from muco.data.m3t.sidecar import load_sidecar
from muco.data.seeds import stable_seed
from muco.inputs.sequence import check_user_text

log = logging.getLogger("muco.data")

Band = tuple[int, int]


def check_band(band: Any, where: str) -> Band:
    try:
        lo, hi = (int(x) for x in band)
        ok = [int(x) == x for x in band] == [True, True]
    except (TypeError, ValueError):
        ok = False
    if not ok or not 1 <= lo <= hi:
        raise ValueError(f"{where}: band must be [lo, hi] with integer ranks 1 <= lo <= hi, got {band!r}")
    return lo, hi


def check_per_turn(per_turn: Any, where: str) -> int:
    if isinstance(per_turn, bool) or not isinstance(per_turn, int) or per_turn < 1:
        raise ValueError(f"{where}: per_turn must be an integer >= 1, got {per_turn!r}")
    return per_turn


@dataclass
class NegativesConfig:
    """Mined negatives for a training run (``data.records.negatives`` in YAML).

    Args:
        sidecar: the mined-negatives sidecar directory (``muco mine`` output, with its ``manifest.json``).
        band: inclusive rank band ``[lo, hi]`` the negatives are drawn from (1 = hardest kept negative).
        per_turn: negatives per query turn; each draw is packed into one K-turn negative sequence per sample.
    """

    sidecar: str
    band: tuple[int, int] = (1, 10)
    per_turn: int = 1

    def __post_init__(self) -> None:
        if not isinstance(self.sidecar, (str, Path)) or not str(self.sidecar):
            raise ValueError(f"data.records.negatives.sidecar must be a path, got {self.sidecar!r}")
        self.sidecar = str(self.sidecar)
        self.band = check_band(self.band, "data.records.negatives")
        self.per_turn = check_per_turn(self.per_turn, "data.records.negatives")

    @classmethod
    def coerce(cls, value: NegativesConfig | Mapping[str, Any] | None) -> NegativesConfig | None:
        """Accept the dict form (YAML, saved hyper-parameters); unknown keys are an error."""
        if value is None or isinstance(value, cls):
            return value
        if not isinstance(value, Mapping):
            raise TypeError(f"data.records.negatives must be a mapping with sidecar/band/per_turn, got {value!r}")
        unknown = set(value) - {"sidecar", "band", "per_turn"}
        if unknown:
            raise ValueError(f"data.records.negatives: unknown keys {sorted(unknown)}; expected sidecar, band, "
                             "per_turn")
        if "sidecar" not in value:
            raise ValueError("data.records.negatives needs a sidecar (the `muco mine` output directory)")
        return cls(**value)


def negative_rng(seed: int, epoch: int, key: str) -> random.Random:
    """The RNG of a sample's negative draws for (global seed, epoch, sample key); independent of the turn draws."""
    return random.Random(stable_seed("negatives", seed, epoch, key))


# per sample key: stored turn index -> the texts of that turn's negatives inside the band, in rank order
NegativeTable = dict[str, dict[int, tuple[str, ...]]]


def band_table(mined: Mapping[tuple[str, int], Sequence[Any]], band: Band) -> NegativeTable:
    """Keep only the negatives whose rank lies in ``band`` (compact: far fewer texts than the sidecar holds;
    equal texts are interned, so a popular target is stored once)."""
    lo, hi = band
    table: NegativeTable = {}
    for (key, turn), negs in mined.items():
        texts = tuple(sys.intern(str(n.text)) for n in negs if lo <= int(n.rank) <= hi)
        if texts:
            table.setdefault(str(key), {})[int(turn)] = texts
    return table


class NegativeSampler:
    """Draws each sample's negatives: ``per_turn`` lists of K texts (turn order), ``None`` where missing."""

    def __init__(self, table: NegativeTable, per_turn: int = 1) -> None:
        self.table = table
        self.per_turn = check_per_turn(per_turn, "negative sampler")

    @classmethod
    def from_mined(cls, mined: Mapping[tuple[str, int], Sequence[Any]], band: Band, per_turn: int = 1
                   ) -> NegativeSampler:
        """From the ``{(key, turn): [Neg(text, rank, sim), ...]}`` mapping that ``load_sidecar`` returns."""
        return cls(band_table(mined, check_band(band, "negative sampler")), per_turn)

    def __len__(self) -> int:
        """Samples with at least one negative in the band."""
        return len(self.table)

    def num_turns(self) -> int:
        """(sample, turn) pairs with at least one negative in the band."""
        return sum(len(t) for t in self.table.values())

    def draw(self, key: str, turns: Sequence[int], rng: random.Random) -> list[list[str | None]]:
        """Negatives of the sample ``key`` whose drawn stored turn indices are ``turns`` (in drawn order).

        Returns ``per_turn`` lists, each with one text (or ``None``: missing) per drawn turn, in the same order.
        Within a turn the draws are without replacement, uniform over the band's negatives.
        """
        mine = self.table.get(key, {})
        draws: list[list[str | None]] = [[None] * len(turns) for _ in range(self.per_turn)]
        for k, turn in enumerate(turns):
            cands = mine.get(turn, ())
            if not cands:
                continue
            for j, text in enumerate(rng.sample(cands, min(self.per_turn, len(cands)))):
                draws[j][k] = text
        return draws

    def draw_seeded(self, key: str, turns: Sequence[int], seed: int, epoch: int) -> list[list[str | None]]:
        """:meth:`draw` with the sample's own RNG (:func:`negative_rng`); a drawn text holding a reserved
        special-token string raises :class:`~muco.data.m3t.collate.BadSampleError` (the stream skips the sample)."""
        draws = self.draw(key, turns, negative_rng(seed, epoch, key))
        for j, draw in enumerate(draws):
            for k, text in enumerate(draw):
                if text is not None:
                    check_user_text(text, key, f"mined negative {j} of stored turn {turns[k]}")
        return draws


def load_negatives(cfg: NegativesConfig, train_samples: int | None = None) -> NegativeSampler:
    """Read ``cfg.sidecar`` once and keep its ``cfg.band``; a missing or malformed sidecar fails here, with
    the path in the message, before any training step. Logs how many samples (of ``train_samples``) have
    negatives in the band."""
    path = Path(cfg.sidecar)
    if not (path / "manifest.json").is_file():
        what = "does not exist" if not path.exists() else "has no manifest.json"
        raise FileNotFoundError(f"data.records.negatives.sidecar={cfg.sidecar!r} {what}; point it at the directory "
                                "that `muco mine` wrote (it holds manifest.json and part-*.jsonl.gz)")
    try:
        mined = load_sidecar(path)
        sampler = NegativeSampler.from_mined(mined, cfg.band, cfg.per_turn)
    except Exception as e:  # any reader error: a malformed sidecar
        raise ValueError(f"data.records.negatives.sidecar={cfg.sidecar!r} is not a readable negatives sidecar "
                         f"({type(e).__name__}: {e})") from e
    n, (lo, hi) = len(sampler), cfg.band
    share = f" of {train_samples} ({100 * n / train_samples:.1f}%)" if train_samples else ""
    log.info("mined negatives from %s: %d training samples%s have negatives in ranks %d-%d (%d sample turns); "
             "%d per turn", cfg.sidecar, n, share, lo, hi, sampler.num_turns(), cfg.per_turn)
    if n == 0:
        log.warning("no sample of %s has a negative in ranks %d-%d: every negative is masked; check "
                    "data.records.negatives.band against the sidecar's top_k", cfg.sidecar, lo, hi)
    return sampler
