"""Random negatives in the mined-negatives sidecar format: the control arm of hard-negative rounds.

``python -m muco.rounds.random_negatives --shards <manifest.json | pattern> --output <dir> [--top-k 30]
[--seed 0]`` writes, for every (sample key, stored turn) of local M3T shards, ``top_k`` target texts drawn
uniformly from the corpus (every unique target text of the shards, as ``muco mine`` builds it), in exactly the
sidecar format of ``muco mine`` (:mod:`muco.data.m3t.sidecar`), so training reads it through
``data.records.negatives`` unchanged. A draw is never the turn's positive nor another target of the same sample, nor
a near-duplicate of those (:func:`muco.mine.select.normalize_text`): the same filters as mining, minus the
similarity ones -- nothing is embedded, so ``pos_sim`` and every ``sim`` are written as 0.0 and the manifest's
similarity statistics are None. Ranks 1..top_k are the draw order, so any rank band is a uniform random draw.
"""

from __future__ import annotations

import argparse
import random
import sys
import tarfile
from collections.abc import Iterator, Sequence
from pathlib import Path

from muco.data.m3t.records import M3TRecord
from muco.data.m3t.sidecar import write_sidecar
from muco.data.seeds import stable_seed
from muco.data.shards import is_remote, resolve_shards
from muco.mine.select import REASONS, normalize_text

__all__ = ["read_targets", "random_negatives", "main"]


def read_targets(shards: str | Sequence[str]) -> list[tuple[str, list[str]]]:
    """``[(key, [target of each stored turn])]`` of local M3T shards, in shard order."""
    out = []
    for url in resolve_shards(list(shards) if not isinstance(shards, str) else shards).urls:
        if is_remote(url):
            raise ValueError(f"random negatives read local shards only, got {url}")
        with tarfile.open(url) as tar:
            for member in tar:
                name = Path(member.name).name
                if not member.isfile() or not name.endswith(".json"):
                    continue
                key = name.split(".", 1)[0]
                f = tar.extractfile(member)
                if f is None:
                    continue
                record = M3TRecord.from_json(key, f.read())
                out.append((key, [t.target for t in record.turns]))
    return out


def random_negatives(shards: str | Sequence[str], output: str | Path, top_k: int = 30, seed: int = 0) -> dict:
    """Write the sidecar; returns its summary. Each (key, turn) has its own seeded RNG (stable across runs)."""
    if top_k < 1:
        raise ValueError(f"top_k must be >= 1, got {top_k}")
    samples = read_targets(shards)
    corpus = sorted({t for _, ts in samples for t in ts})  # the corpus of `muco mine`
    norm = [normalize_text(t) for t in corpus]
    filtered = dict.fromkeys(REASONS, 0)
    short = 0

    def rows() -> Iterator[dict]:
        nonlocal short
        for key, targets in samples:
            own = {normalize_text(t) for t in targets}
            for turn, pos in enumerate(targets):
                rng = random.Random(stable_seed("random-negatives", seed, key, turn))
                picked: list[str] = []
                # rejection sampling: the excluded texts are a handful among thousands
                for _ in range(20 * top_k):
                    if len(picked) == top_k:
                        break
                    j = rng.randrange(len(corpus))
                    text = corpus[j]
                    if text == pos:
                        filtered["positive"] += 1
                    elif text in targets:
                        filtered["same_sample"] += 1
                    elif norm[j] in own:
                        filtered["near_duplicate"] += 1
                    elif text not in picked:
                        picked.append(text)
                short += len(picked) < top_k
                yield {"key": key, "turn": turn, "pos_sim": 0.0,
                       "negatives": [{"text": t, "rank": r, "sim": 0.0} for r, t in enumerate(picked, 1)]}

    lines = list(rows())  # first: the summary counts the filtered draws (18k rows x 30 texts: small)
    urls = resolve_shards(list(shards) if not isinstance(shards, str) else shards).urls
    settings = {"kind": "random", "shards": [str(Path(u).resolve()) for u in urls], "top_k": top_k, "seed": seed}
    summary = {"query_turns": len(lines), "mean_pos_sim": None, "mean_neg_sim": None,
               "mean_neg_sim_by_rank": None, "filtered": filtered,
               "negatives_kept": sum(len(x["negatives"]) for x in lines), "turns_short": short,
               "turns_without_negatives": sum(not x["negatives"] for x in lines), "samples": len(samples),
               "skipped_samples": 0, "duplicate_keys": 0, "corpus_texts": len(corpus), "random": True}
    write_sidecar(output, lines, {"model": None, "shards": settings["shards"], "top_k": top_k, "margin": None,
                                  "summary": summary, "settings": settings})
    return summary


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m muco.rounds.random_negatives",
                                description="random corpus negatives as a mined-negatives sidecar")
    p.add_argument("--shards", nargs="+", required=True, help="manifest.json or shard pattern(s), local")
    p.add_argument("--output", required=True, help="sidecar directory to write")
    p.add_argument("--top-k", type=int, default=30, help="negatives per query turn")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    summary = random_negatives(args.shards, args.output, args.top_k, args.seed)
    print(f"{args.output}: {summary['query_turns']} query turns, {summary['corpus_texts']} corpus texts")
    return 0


if __name__ == "__main__":
    sys.exit(main())
