"""`muco data convert`: the command line over the converters of `muco.convert` (`m3t`: pretraining records,
`pairs`: fine-tuning pairs)."""

from __future__ import annotations

import argparse
import signal
import sys
from collections.abc import Callable
from concurrent.futures.process import BrokenProcessPool

from muco.convert.m3t import convert_jsonl, convert_parquet
from muco.convert.pairs import convert_pairs
from muco.convert.pipeline import ConvertSummary, Interrupted
from muco.data.records import MAX_SEQUENCE_CHARS, MAX_TEXT_CHARS

DESCRIPTION = ("Convert M3T records into webdataset shards: ``{key}.<jpg|png|webp>`` + ``{key}.json`` "
               "(docs/method.md §2.3).")
EPILOG = (
    "Rejected records (bad rows, JSONL lines that are not UTF-8 or not JSON, schema errors, missing or broken "
    "images, texts over the length limits) are listed with their row or line number and reason in the rejects "
    "file; every good record is converted. The manifest is written last: an interrupted conversion leaves none, "
    "and training refuses to start on its output until it is re-run. Exit status: 0 converted, 1 nothing written, "
    "2 bad arguments or inputs, 128+N stopped by signal N (SIGINT 130, SIGTERM 143); the workers stop with it."
)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="muco data convert", description=DESCRIPTION,
                                epilog=EPILOG)
    p.add_argument("inputs", nargs="+", help="released M3T parquet file(s), or one JSONL of records")
    p.add_argument("--kind", choices=("m3t", "pairs"), default="m3t",
                   help="m3t: pretraining records; pairs: fine-tuning pairs (MMEB-train layout or pair JSONL)")
    p.add_argument("--max-negatives", type=int, default=None, help="pairs: keep at most N hard negatives")
    p.add_argument("--format", choices=("auto", "parquet", "jsonl"), default="auto")
    p.add_argument("--image-root", required=True, help="directory the image paths are relative to")
    p.add_argument("--output", required=True, help="shard pattern with a %%-index, e.g. out/train-%%06d.tar")
    p.add_argument("--max-samples-per-shard", type=int, default=1000)
    p.add_argument("--max-bytes-per-shard", type=int, default=1 << 30)
    p.add_argument("--workers", type=int, default=0,
                   help="reader/validator processes (0: in-process); they exit when the converter stops or dies")
    p.add_argument("--max-side", type=int, default=None, help="re-encode images whose long side exceeds this")
    p.add_argument("--jpeg-quality", type=int, default=90)
    p.add_argument("--turns", type=int, default=7, help="expected turns per record (0: do not check)")
    p.add_argument("--max-text-chars", type=int, default=MAX_TEXT_CHARS, metavar="N",
                   help=f"reject a record with a text longer than N characters: a query candidate, target, "
                        f"negative, pair text or caption (default {MAX_TEXT_CHARS}; 0: no limit)")
    p.add_argument("--max-sequence-chars", type=int, default=MAX_SEQUENCE_CHARS, metavar="N",
                   help=f"reject a record whose query or target sequence holds more than N characters of text: "
                        f"all turns, the longest candidate of each; pairs: a side's text plus the other side's "
                        f"counterpart (default {MAX_SEQUENCE_CHARS}; 0: no limit)")
    p.add_argument("--manifest", default=None, help="default: manifest.json next to the shards")
    p.add_argument("--rejects", default=None, help="default: rejects.jsonl next to the shards")
    p.add_argument("--key-prefix", default=None, help="parquet keys: <prefix><row:09d>")
    p.add_argument("--limit", type=int, default=None, help="convert at most this many input records")
    p.add_argument("--overwrite", action="store_true",
                   help="replace an earlier conversion at --output: its manifest is removed first, then all of its "
                        "shards, and the new manifest is written when the new set is complete")
    return p


def report(convert: Callable[[], ConvertSummary]) -> int:
    """Run one conversion for the command line: the summary on stdout, or one line on stderr and the exit code."""
    try:
        summary = convert()
    except (Interrupted, KeyboardInterrupt) as e:
        name, signum = (e.name, e.signum) if isinstance(e, Interrupted) else ("SIGINT", signal.SIGINT)
        print(f"muco data convert: interrupted by {name}: the workers were stopped and the unfinished output has no "
              "manifest, so training will not read it; re-run the same command with --overwrite", file=sys.stderr)
        return 128 + int(signum)
    except BrokenProcessPool:
        print("muco data convert: error: a worker process died (killed from outside, or out of memory) and the "
              "output has no manifest; re-run with --overwrite and fewer --workers (or a smaller --max-side)",
              file=sys.stderr)
        return 2
    except (OSError, ValueError) as e:
        print(f"muco data convert: error: {e}", file=sys.stderr)
        return 2
    print(summary)
    return 0 if summary.written else 1


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.kind == "pairs":
        return report(lambda: convert_pairs(
            args.inputs, args.image_root, args.output, fmt=args.format, max_negatives=args.max_negatives,
            max_side=args.max_side, jpeg_quality=args.jpeg_quality,
            max_samples_per_shard=args.max_samples_per_shard, max_bytes_per_shard=args.max_bytes_per_shard,
            workers=args.workers, manifest=args.manifest, rejects=args.rejects, key_prefix=args.key_prefix,
            limit=args.limit, overwrite=args.overwrite, max_text_chars=args.max_text_chars,
            max_sequence_chars=args.max_sequence_chars))
    fmt = args.format
    if fmt == "auto":
        fmt = "jsonl" if args.inputs[0].endswith((".jsonl", ".json")) else "parquet"
    common = dict(turns=args.turns or None, max_side=args.max_side, jpeg_quality=args.jpeg_quality,
                  max_samples_per_shard=args.max_samples_per_shard,
                  max_bytes_per_shard=args.max_bytes_per_shard,
                  workers=args.workers, manifest=args.manifest, rejects=args.rejects, limit=args.limit,
                  overwrite=args.overwrite, max_text_chars=args.max_text_chars,
                  max_sequence_chars=args.max_sequence_chars)

    def run() -> ConvertSummary:
        if fmt == "parquet":
            return convert_parquet(args.inputs, args.image_root, args.output, key_prefix=args.key_prefix, **common)
        if len(args.inputs) != 1:
            raise ValueError("give exactly one JSONL input (or several parquet files)")
        return convert_jsonl(args.inputs[0], args.image_root, args.output, **common)

    return report(run)
