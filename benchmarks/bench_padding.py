"""Padding in real pretraining batches at M3T shapes: the share of computed token positions that are real tokens
(``perf/token_efficiency`` in training), per side, for batches as the stream makes them (random order) and for
batches of the stream's length bucketing (``data.length_bucketing``: :class:`muco.data.length_buckets.LengthBuckets`
with the M3T record kind's length key; samples sorted by length within windows of W batches, then cut into
batches), for several windows.

Samples are M3T-shaped (``_shapes``: scikit-image photos at the pretraining resolution, 529-782 visual tokens;
7 turns with 15-25-word queries, short answers and an 80-120-word caption), turns drawn as in training, collated by
the training collator with the Qwen2 vocabulary. No model runs; the numbers are token counts.

    python benchmarks/bench_padding.py [--samples 256] [--batch-size 32] [--turns 7] [--windows 2 4 8]
"""

from __future__ import annotations

import argparse
import random
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _shapes import m3t_record, photos  # noqa: E402

from muco.data.length_buckets import LengthBuckets  # noqa: E402
from muco.data.m3t.collate import PretrainCollator, PretrainSample  # noqa: E402
from muco.data.m3t.kind import M3TRecords  # noqa: E402
from muco.data.m3t.turns import draw_turns  # noqa: E402
from muco.data.seeds import sample_rng  # noqa: E402
from muco.inputs.image_policy import ImagePolicy  # noqa: E402
from muco.inputs.tokenizer import qwen_offline_tokenizer  # noqa: E402
from muco.objectives.base import sequence_counts  # noqa: E402


def efficiency(collator: PretrainCollator, batches: list[list[PretrainSample]]) -> dict[str, float]:
    totals = {"query": [0, 0], "target": [0, 0]}
    for samples in batches:
        batch = collator(samples)
        for side in totals:
            tokens, positions = sequence_counts([batch[side]])
            totals[side][0] += tokens
            totals[side][1] += positions
    out = {side: t / p for side, (t, p) in totals.items()}
    out["overall"] = sum(t for t, _ in totals.values()) / sum(p for _, p in totals.values())
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--samples", type=int, default=256)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--turns", type=int, default=7)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--windows", type=int, nargs="+", default=[2, 4, 8],
                    help="length-bucketing windows to measure, in batches (data.length_bucketing)")
    args = ap.parse_args()
    policy = ImagePolicy.preset("pretrain")
    pics = [policy.prepare(im) for _, im in photos(policy.short_side or 640)]
    collator = PretrainCollator(qwen_offline_tokenizer(), policy)
    samples = []
    for i in range(args.samples):
        key = f"s{i:06d}"
        queries, targets = draw_turns(m3t_record(args.seed * 100_000 + i)["turns"], args.turns,
                                      sample_rng(args.seed, 0, key))
        samples.append(PretrainSample(key=key, image=pics[i % len(pics)], queries=queries, targets=targets))
    random.Random(args.seed).shuffle(samples)
    b = args.batch_size
    stream = [samples[i : i + b] for i in range(0, len(samples) - b + 1, b)]
    results = {"stream order": efficiency(collator, stream)}
    key = M3TRecords(turns_per_sample=args.turns).length_key(policy)
    used = len(stream) * b  # the samples of the stream's batches, so every column sees the same ones
    for w in args.windows:  # the stream's stage: consecutive windows of the shuffled stream (the last one cut to
        # what is left, as the stream cuts it to a worker's batch quota), each sorted, cut and shuffled
        buckets, size = LengthBuckets(key, w, b), w * b
        rng = random.Random(args.seed)
        bucketed = [batch for i in range(0, used, size)
                    for batch in buckets.batches(samples[i : min(i + size, used)], rng)]
        results[f"bucketed W={w}"] = efficiency(collator, bucketed)
    print(f"{args.samples} M3T-shaped samples, {args.turns} turns, batches of {b}; "
          "token efficiency (real tokens / computed positions)")
    print(f"{'':>9}" + "".join(f"  {name:>22}" for name in results))
    for side in ("query", "target", "overall"):
        print(f"{side:>9}" + "".join(f"  {r[side]:>22.3f}" for r in results.values()))
    base = results["stream order"]["overall"]
    print(" ".join(f"ratio[{name}]={r['overall'] / base:.3f}" for name, r in results.items() if name != "stream order"))


if __name__ == "__main__":
    main()
