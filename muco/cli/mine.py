"""``muco mine``: mine hard negatives for every query turn of a shard set with a trained model.

    muco mine --model runs/x/checkpoints/last.ckpt --shards data/m3t/manifest.json --output runs/x/mined \\
        [--top-k 100] [--margin 0.05] [--max-ratio R] [--extra N] [--batch-size 16] [--device cuda] \\
        [--devices N] [--image-policy train] [--query-chunk 1024] [--corpus-chunk 16384] [--overwrite] \
        [--query-draws canonical|train --draw-epoch E [--draw-seed S]]

Writes the sidecar directory of :mod:`muco.data.m3t.sidecar` (one line per sample and stored turn, negatives with
rank and similarity) and prints the summary. A directory already holding a complete sidecar with the same
model, shards and settings is left alone (``--overwrite`` mines again). ``--devices N`` runs N processes
(DDP, gloo on CPU): each embeds its share of the samples and of the unique targets and keeps only its share of
the target embeddings; its query turns visit every process's share in a ring (:mod:`muco.mine.ring`); rank 0
writes the sidecar. The result equals the single-process one, line for line. On CUDA the candidate search
multiplies in bf16 and the kept candidates are re-scored exactly in fp32 (:mod:`muco.mine.search`).

``--query-draws train --draw-epoch E`` mines the query sequences training draws in data epoch E (the turns, their
order and candidate queries of :meth:`muco.data.m3t.decode.M3TDecoder.draw`, with the checkpoint's ``data.seed``
and ``data.records.turn_order``; ``--draw-seed`` overrides the seed) instead of the stored order with the first
candidate query; turns not drawn in E are mined canonically in further sequences (:mod:`muco.mine.embed`).

The pipeline itself is :mod:`muco.mine.pipeline`; this module turns the command line into its call.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Sequence
from pathlib import Path

import torch

from muco.data.m3t.sidecar import MANIFEST
from muco.data.shards import resolve_shards
from muco.inputs.image_policy import PRESETS
from muco.mine.pipeline import (
    MineConfig,
    is_complete,
    mine,
    resolve_draw_seed,
    resolve_image_policy,
    resolve_turns_per_sequence,
    settings,
)

log = logging.getLogger("muco.mine")


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="muco mine", description="mine hard negatives with a trained model")
    p.add_argument("--model", required=True, help="a .ckpt of a muco run or an exported model directory")
    p.add_argument("--shards", required=True, nargs="+",
                   help="shard pattern(s), glob(s) or the converter's manifest.json (one data source)")
    p.add_argument("--output", required=True, help="sidecar directory to write")
    p.add_argument("--top-k", type=int, default=100, help="negatives kept per query turn")
    p.add_argument("--margin", type=float, default=0.05,
                   help="drop likely false negatives: sim > pos_sim - margin (negative value: off)")
    p.add_argument("--max-ratio", type=float, default=None,
                   help="also drop candidates with sim > max_ratio * pos_sim (default: off)")
    p.add_argument("--extra", type=int, default=None,
                   help="candidates searched beyond top_k + turns per sample (default: 2 * top_k)")
    p.add_argument("--batch-size", type=int, default=16, help="samples (queries) / texts (targets) per forward")
    p.add_argument("--query-chunk", type=int, default=1024, help="query turns per search chunk")
    p.add_argument("--corpus-chunk", type=int, default=16384, help="target texts per search chunk")
    p.add_argument("--device", default=None, help="cpu | cuda | cuda:N (default: cuda when available)")
    p.add_argument("--devices", type=int, default=1, help="processes (DDP): GPUs, or CPU processes on cpu")
    p.add_argument("--num-workers", type=int, default=2, help="DataLoader workers reading and decoding shards")
    p.add_argument("--autocast", choices=["none", "bfloat16", "float16"], default=None,
                   help="autocast dtype (default: bfloat16 on cuda, none on cpu)")
    p.add_argument("--image-policy", default="train",
                   help="`train`: the training data's policy recorded in the checkpoint (else `pretrain`); "
                        f"`model`: the model's own; or a preset: {', '.join(PRESETS)}")
    p.add_argument("--turns-per-sequence", default="train",
                   help="query turns per sequence: train (the checkpoint's data.records.turns_per_sample, else all), "
                        "all, or a number")
    p.add_argument("--query-draws", choices=["canonical", "train"], default="canonical",
                   help="canonical: stored turn order, first candidate query; train: the turns and candidate "
                        "queries training draws in data epoch --draw-epoch")
    p.add_argument("--draw-epoch", type=int, default=None,
                   help="with --query-draws train: the data epoch to draw for (the first epoch of the next round)")
    p.add_argument("--draw-seed", type=int, default=None,
                   help="with --query-draws train: the data seed (default: the checkpoint's data.seed)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.add_argument("--overwrite", action="store_true", help="mine again even if the output is complete")
    args = p.parse_args(argv)
    for name in ("top_k", "batch_size", "query_chunk", "corpus_chunk", "devices"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1")
    if args.num_workers < 0 or (args.extra is not None and args.extra < 0):
        p.error("--num-workers and --extra must be >= 0")
    if args.image_policy not in ("train", "model", *PRESETS):
        p.error(f"--image-policy must be train, model or one of {sorted(PRESETS)}")
    if args.query_draws == "train" and (args.draw_epoch is None or args.draw_epoch < 0):
        p.error("--query-draws train needs --draw-epoch >= 0 (the data epoch whose draws to mine)")
    if args.query_draws == "canonical" and (args.draw_epoch is not None or args.draw_seed is not None):
        p.error("--draw-epoch and --draw-seed go with --query-draws train")
    return args


def _turns_choice(choice: str) -> str | int:
    """``--turns-per-sequence``: train, all or a positive number."""
    if choice in ("train", "all"):
        return choice
    try:
        k = int(choice)
    except ValueError:
        k = 0
    if k < 1:
        raise SystemExit(f"muco mine: --turns-per-sequence must be train, all or a positive number, got {choice!r}")
    return k


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    shard_set = resolve_shards(args.shards)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    draws: dict = {}
    if args.query_draws == "train":
        try:
            seed, order = resolve_draw_seed(args.model, args.draw_seed)
        except ValueError as e:
            raise SystemExit(f"muco mine: {e} (--draw-seed)") from e
        draws = {"query_draws": "train", "draw_seed": seed, "draw_epoch": args.draw_epoch, "turn_order": order}
    cfg = MineConfig(
        model=args.model, shards=tuple(shard_set.urls), output=args.output, top_k=args.top_k,
        margin=None if args.margin < 0 else args.margin, max_ratio=args.max_ratio, extra=args.extra,
        image_policy=resolve_image_policy(args.model, args.image_policy),
        turns_per_sequence=resolve_turns_per_sequence(args.model, _turns_choice(args.turns_per_sequence)),
        autocast=args.autocast or ("bfloat16" if device.type == "cuda" else "none"), batch_size=args.batch_size,
        query_chunk=args.query_chunk, corpus_chunk=args.corpus_chunk, num_workers=args.num_workers,
        num_samples=shard_set.num_samples, progress=not args.no_progress, **draws,
    )
    out = Path(args.output)
    # decided before any process starts (and again, identically, by every rank the launcher starts)
    if not args.overwrite and is_complete(out, settings(cfg)):
        print(f"muco mine: {out} already holds negatives mined with these settings; --overwrite to mine again")
        return 0
    summary = mine(cfg, device, args.devices)
    if summary is not None:
        log.info("wrote %s", out / MANIFEST)
        print(json.dumps(summary, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
