"""`muco data convert`: the command line over the converters of `muco.convert` (`m3t`: pretraining records,
`pairs`: fine-tuning pairs), and `muco data merge-manifests`, which joins the parts of a `--part I/N` conversion."""

from __future__ import annotations

import argparse
import re
import signal
import sys
from collections.abc import Callable
from concurrent.futures.process import BrokenProcessPool
from pathlib import Path

from muco.convert.downloaded import is_download_dir
from muco.convert.m3t import convert_jsonl, convert_parquet
from muco.convert.pairs import convert_pairs
from muco.convert.parts import merge_parts, parse_part
from muco.convert.pipeline import EARLY_ABORT_RECORDS, PROGRESS_EVERY_S, ConvertSummary, Interrupted, Progress
from muco.data.records import MAX_SEQUENCE_CHARS, MAX_TEXT_CHARS

DESCRIPTION = ("Convert M3T records into webdataset shards: ``{key}.<jpg|png|webp>`` + ``{key}.json`` "
               "(docs/method.md §2.3).")
EPILOG = (
    "Rejected records (bad rows, JSONL lines that are not UTF-8 or not JSON, schema errors, missing or broken "
    "images, images whose download failed, texts over the length limits) are listed with their row or line "
    "number and reason in the rejects "
    "file; every good record is converted. Resumable: a journal next to the shards (<prefix>progress.jsonl) "
    "records each finished shard, and re-running the same command verifies those shards (size, sha256) and "
    "continues after them, to the same bytes as an uninterrupted run; a complete conversion is only verified. "
    "The manifest is written last: an unfinished conversion has none, and training refuses to start on its "
    "output. Exit status: 0 converted (a --part: finished), 1 nothing written, 2 bad arguments or inputs, "
    "128+N stopped by signal N (SIGINT 130, SIGTERM 143); the workers stop with it."
)


def _part(text: str) -> tuple[int, int]:
    try:
        return parse_part(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e).removeprefix(f"--part {text!r}: ")) from None


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="muco data convert", description=DESCRIPTION,
                                epilog=EPILOG)
    p.add_argument("inputs", nargs="+", help="released M3T parquet file(s), or one JSONL of records")
    p.add_argument("--kind", choices=("m3t", "pairs"), default="m3t",
                   help="m3t: pretraining records; pairs: fine-tuning pairs (MMEB-train layout or pair JSONL)")
    p.add_argument("--max-negatives", type=int, default=None, help="pairs: keep at most N hard negatives")
    p.add_argument("--format", choices=("auto", "parquet", "jsonl"), default="auto")
    p.add_argument("--image-root", required=True,
                   help="directory the image paths are relative to, or a `muco data download` output (recognised "
                        "by its urls.parquet): rows then read their downloaded images, and a row whose download "
                        "failed is rejected as download_failed (not_downloaded: no URL, or not fetched yet)")
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
    p.add_argument("--part", type=_part, default=None, metavar="I/N",
                   help="convert only the I-th (0-based) of N contiguous, disjoint ranges of the input rows (over "
                        "all input files, in order), e.g. --part $SLURM_ARRAY_TASK_ID/$SLURM_ARRAY_TASK_COUNT in "
                        "an --array=0-(N-1) job; part I writes <prefix>pIIII-%%06d.tar shards, manifest-pIIII.json "
                        "and rejects-pIIII.jsonl; join the parts with `muco data merge-manifests <dir>`")
    p.add_argument("--overwrite", action="store_true",
                   help="start over instead of resuming: the earlier conversion's manifest is removed first, then "
                        "its shards and journal, and the new manifest is written when the new set is complete")
    p.add_argument("--early-abort", type=int, default=EARLY_ABORT_RECORDS, metavar="K",
                   help=f"stop at once when the first K records (all, when fewer) all miss their image: the image "
                        f"root is wrong (default {EARLY_ABORT_RECORDS}; 0: off)")
    p.add_argument("--progress", choices=("auto", "bar", "log", "off"), default="auto",
                   help="auto (default): a progress bar on a terminal, else a log line to stderr every "
                        "--log-every seconds")
    p.add_argument("--log-every", type=float, default=PROGRESS_EVERY_S, metavar="SECONDS",
                   help=f"seconds between progress log lines (default {PROGRESS_EVERY_S:g})")
    return p


def report(convert: Callable[[], ConvertSummary]) -> int:
    """Run one conversion for the command line: the summary on stdout, or one line on stderr and the exit code."""
    try:
        summary = convert()
    except (Interrupted, KeyboardInterrupt) as e:
        name, signum = (e.name, e.signum) if isinstance(e, Interrupted) else ("SIGINT", signal.SIGINT)
        print(f"muco data convert: interrupted by {name}: the workers were stopped, the finished shards are kept and "
              "the output has no manifest yet, so training will not read it; re-run the same command to resume "
              "(--overwrite starts over)", file=sys.stderr)
        return 128 + int(signum)
    except BrokenProcessPool:
        print("muco data convert: error: a worker process died (killed from outside, or out of memory) and the "
              "output has no manifest yet; re-run the same command with fewer --workers (or a smaller --max-side): "
              "it resumes after the finished shards", file=sys.stderr)
        return 2
    except (OSError, ValueError) as e:
        print(f"muco data convert: error: {' '.join(str(e).split())}", file=sys.stderr)
        return 2
    print(summary)
    if summary.part is not None:
        count = summary.part[1]
        manifest = Path(summary.manifest)
        every = manifest.with_name(re.sub(r"-p\d+(\.[^.]*)?$", r"-p*\1", manifest.name))
        print(f"when all {count} parts are done: muco data merge-manifests {every}")
        return 0  # a part may legitimately hold no good record; the merge judges the whole
    return 0 if summary.written else 1


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    progress = None if args.progress == "off" else Progress(args.progress, args.log_every)
    extra = dict(part=args.part, progress=progress, early_abort=args.early_abort)
    if args.kind == "pairs" and is_download_dir(args.image_root):
        print(f"muco data convert: error: --image-root {args.image_root} is a `muco data download` output; the "
              "download join reads M3T rows only so far: convert pairs from an image root of files",
              file=sys.stderr)
        return 2
    if args.kind == "pairs":
        return report(lambda: convert_pairs(
            args.inputs, args.image_root, args.output, fmt=args.format, max_negatives=args.max_negatives,
            max_side=args.max_side, jpeg_quality=args.jpeg_quality,
            max_samples_per_shard=args.max_samples_per_shard, max_bytes_per_shard=args.max_bytes_per_shard,
            workers=args.workers, manifest=args.manifest, rejects=args.rejects, key_prefix=args.key_prefix,
            limit=args.limit, overwrite=args.overwrite, max_text_chars=args.max_text_chars,
            max_sequence_chars=args.max_sequence_chars, **extra))
    fmt = args.format
    if fmt == "auto":
        fmt = "jsonl" if args.inputs[0].endswith((".jsonl", ".json")) else "parquet"
    common = dict(turns=args.turns or None, max_side=args.max_side, jpeg_quality=args.jpeg_quality,
                  max_samples_per_shard=args.max_samples_per_shard,
                  max_bytes_per_shard=args.max_bytes_per_shard,
                  workers=args.workers, manifest=args.manifest, rejects=args.rejects, limit=args.limit,
                  overwrite=args.overwrite, max_text_chars=args.max_text_chars,
                  max_sequence_chars=args.max_sequence_chars, **extra)

    def run() -> ConvertSummary:
        if fmt == "parquet":
            return convert_parquet(args.inputs, args.image_root, args.output, key_prefix=args.key_prefix, **common)
        if len(args.inputs) != 1:
            raise ValueError("give exactly one JSONL input (or several parquet files)")
        return convert_jsonl(args.inputs[0], args.image_root, args.output, **common)

    return report(run)


MERGE_DESCRIPTION = ("Join the parts of a `muco data convert --part I/N` conversion: the dataset manifest (the "
                     "parts' shards in part order, so the samples come in the order of a single conversion) and one "
                     "rejects file.")
MERGE_EPILOG = ("Refuses, naming the part and the fix, when a part is missing or unfinished, when the parts come from "
                "different commands, and when two parts wrote the same key. Exit status: 0 merged, 1 merged but "
                "nothing was written, 2 refused.")


def build_merge_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="muco data merge-manifests", description=MERGE_DESCRIPTION,
                                epilog=MERGE_EPILOG)
    p.add_argument("parts", nargs="+", metavar="PART",
                   help="the part manifests (out/manifest-p*.json), or the directory that holds them")
    p.add_argument("--manifest", default=None,
                   help="the dataset manifest to write (default: manifest.json next to the part manifests)")
    p.add_argument("--rejects", default=None, help="the merged rejects (default: rejects.jsonl next to them)")
    p.add_argument("--overwrite", action="store_true",
                   help="replace a manifest at --manifest that is not an earlier merge of these parts")
    return p


def merge_main(argv: list[str] | None = None) -> int:
    args = build_merge_parser().parse_args(argv)
    try:
        summary = merge_parts(args.parts, args.manifest, args.rejects, overwrite=args.overwrite)
    except (OSError, ValueError) as e:
        print(f"muco data merge-manifests: error: {' '.join(str(e).split())}", file=sys.stderr)
        return 2
    print(summary)
    return 0 if summary.written else 1
