"""DataModules of each record kind from one flat set of keyword arguments (what tests vary)."""

from __future__ import annotations

from typing import Any

from muco.data.datamodule import MuCoDataModule
from muco.data.m3t.kind import M3TRecords
from muco.data.pairs.kind import PairRecords

M3T_OPTIONS = ("turns_per_sample", "turns_per_record", "turn_order", "max_text_chars", "max_sequence_chars",
               "negatives")
PAIR_OPTIONS = ("mask_ratio", "full_mask_prob", "collapse_mask_runs")


def m3t_data(*args: Any, **kw: Any) -> MuCoDataModule:
    """``MuCoDataModule(..., records=M3TRecords(<the M3T options among kw>))``."""
    records = M3TRecords(**{k: kw.pop(k) for k in M3T_OPTIONS if k in kw})
    return MuCoDataModule(*args, records=records, **kw)


def pair_data(*args: Any, **kw: Any) -> MuCoDataModule:
    """``MuCoDataModule(..., records=PairRecords(<the masking options among kw>))``."""
    records = PairRecords(**{k: kw.pop(k) for k in PAIR_OPTIONS if k in kw})
    return MuCoDataModule(*args, records=records, **kw)
