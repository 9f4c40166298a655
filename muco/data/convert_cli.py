"""`muco data convert`: the command line over the converters in `muco.data.convert` and `pair_convert`."""

from __future__ import annotations

import argparse
import sys

from muco.data.convert import __doc__ as convert_doc
from muco.data.convert import convert_jsonl, convert_parquet


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="muco data convert", description=convert_doc.split("\n\n")[0])
    p.add_argument("inputs", nargs="+", help="released M3T parquet file(s), or one JSONL of records")
    p.add_argument("--kind", choices=("m3t", "pairs"), default="m3t",
                   help="m3t: pretraining records; pairs: fine-tuning pairs (MMEB-train layout or pair JSONL)")
    p.add_argument("--max-negatives", type=int, default=None, help="pairs: keep at most N hard negatives")
    p.add_argument("--format", choices=("auto", "parquet", "jsonl"), default="auto")
    p.add_argument("--image-root", required=True, help="directory the image paths are relative to")
    p.add_argument("--output", required=True, help="shard pattern with a %%-index, e.g. out/train-%%06d.tar")
    p.add_argument("--max-samples-per-shard", type=int, default=1000)
    p.add_argument("--max-bytes-per-shard", type=int, default=1 << 30)
    p.add_argument("--workers", type=int, default=0, help="reader/validator processes (0: in-process)")
    p.add_argument("--max-side", type=int, default=None, help="re-encode images whose long side exceeds this")
    p.add_argument("--jpeg-quality", type=int, default=90)
    p.add_argument("--turns", type=int, default=7, help="expected turns per record (0: do not check)")
    p.add_argument("--manifest", default=None, help="default: manifest.json next to the shards")
    p.add_argument("--rejects", default=None, help="default: rejects.jsonl next to the shards")
    p.add_argument("--key-prefix", default=None, help="parquet keys: <prefix><row:09d>")
    p.add_argument("--limit", type=int, default=None, help="convert at most this many input records")
    p.add_argument("--overwrite", action="store_true", help="replace existing shards of --output")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.kind == "pairs":
        from muco.data.pair_convert import main_pairs

        return main_pairs(args)
    fmt = args.format
    if fmt == "auto":
        fmt = "jsonl" if args.inputs[0].endswith((".jsonl", ".json")) else "parquet"
    common = dict(turns=args.turns or None, max_side=args.max_side, jpeg_quality=args.jpeg_quality,
                  max_samples_per_shard=args.max_samples_per_shard,
                  max_bytes_per_shard=args.max_bytes_per_shard,
                  workers=args.workers, manifest=args.manifest, rejects=args.rejects, limit=args.limit,
                  overwrite=args.overwrite)
    try:
        if fmt == "parquet":
            summary = convert_parquet(args.inputs, args.image_root, args.output, key_prefix=args.key_prefix,
                                      **common)
        else:
            if len(args.inputs) != 1:
                raise ValueError("give exactly one JSONL input")
            summary = convert_jsonl(args.inputs[0], args.image_root, args.output, **common)
    except (OSError, ValueError) as e:
        print(f"muco data convert: error: {e}", file=sys.stderr)
        return 2
    print(summary)
    return 0 if summary.written else 1

