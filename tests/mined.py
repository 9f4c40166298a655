"""Fixture sidecars in the ``muco-negatives/1`` format that ``muco mine`` writes (written here with gzip + json
directly, so the training side is tested against the format, not against the writer)."""

from __future__ import annotations

import gzip
import json
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path


def write_sidecar(root: Path, rows: Mapping[tuple[str, int], Sequence[str]], parts: int = 2,
                  top_k: int | None = None) -> Path:
    """A sidecar directory: ``rows[(key, stored turn)]`` lists negative texts hardest first (rank 1, 2, ...,
    similarity falling from 0.9); the rows are spread over ``parts`` part files."""
    root.mkdir(parents=True, exist_ok=True)
    items = sorted(rows.items())
    names = []
    for p in range(parts):
        name = f"part-{p:05d}.jsonl.gz"
        names.append(name)
        with gzip.open(root / name, "wt", encoding="utf-8") as f:
            for (key, turn), texts in items[p::parts]:
                negs = [{"text": t, "rank": r + 1, "sim": round(0.9 - 0.01 * r, 4)} for r, t in enumerate(texts)]
                f.write(json.dumps({"key": key, "turn": turn, "pos_sim": 0.95, "negatives": negs}) + "\n")
    manifest = {"format": "muco-negatives/1", "parts": names, "model": "fixture", "shards": [],
                "top_k": top_k or max((len(t) for t in rows.values()), default=0), "margin": 0.0,
                "num_query_turns": len(rows), "summary": {}}
    (root / "manifest.json").write_text(json.dumps(manifest))
    return root


def neg_text(key: str, turn: int, rank: int) -> str:
    """The text of a fixture negative: names its sample, stored turn and rank, so tests can check the draws."""
    return f"neg of {key} turn {turn} rank {rank}"


def ranked_rows(keys: Iterable[str], turns: Iterable[int], top_k: int) -> dict[tuple[str, int], list[str]]:
    """``top_k`` ranked :func:`neg_text` negatives for each (key, turn)."""
    turns = list(turns)
    return {(k, t): [neg_text(k, t, r) for r in range(1, top_k + 1)] for k in keys for t in turns}
