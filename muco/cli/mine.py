"""``muco mine``: mine hard negatives for every query turn of a shard set with a trained model.

    muco mine --model runs/x/checkpoints/last.ckpt --shards data/m3t/manifest.json --output runs/x/mined \\
        [--top-k 100] [--margin 0.05] [--max-ratio R] [--extra N] [--batch-size 16] [--device cuda] \\
        [--devices N] [--image-policy train] [--query-chunk 1024] [--corpus-chunk 16384] [--overwrite]

Writes the sidecar directory of :mod:`muco.mine.sidecar` (one line per sample and stored turn, negatives with
rank and similarity) and prints the summary. A directory already holding a complete sidecar with the same
model, shards and settings is left alone (``--overwrite`` mines again). ``--devices N`` runs N processes
(DDP, gloo on CPU): each embeds its share of the samples and of the unique targets, and searches for its own
query turns; rank 0 writes the sidecar. The result equals the single-process one.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from collections.abc import Iterator, Sequence
from pathlib import Path

import torch

from muco.data.shards import resolve_shards
from muco.distributed import gather_objects
from muco.inputs.image_policy import PRESETS
from muco.mine.dist import barrier, gather_rows, world
from muco.mine.select import REASONS, SelectConfig, mine_negatives, normalized_ids
from muco.mine.sidecar import MANIFEST, SidecarError, read_sidecar_manifest, write_sidecar
from muco.mine.summary import summarize

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
                   help="query turns per sequence: train (the checkpoint's data.turns_per_sample, else all), "
                        "all, or a number")
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
    return args


def resolve_image_policy(model: str | os.PathLike, choice: str) -> str | None:
    """A preset name, or None for the model's own policy (``--image-policy model``)."""
    if choice == "model":
        return None
    if choice != "train":
        return choice
    hp = _datamodule_hparams(model)
    if isinstance(hp.get("image_policy"), str) and hp["image_policy"] in PRESETS:
        return hp["image_policy"]
    return "pretrain"


def resolve_turns_per_sequence(model: str | os.PathLike, choice: str) -> int | None:
    """None (all of a record's turns in one sequence) or K."""
    if choice == "all":
        return None
    if choice != "train":
        try:
            k = int(choice)
        except ValueError:
            k = 0
        if k < 1:
            raise SystemExit(f"muco mine: --turns-per-sequence must be train, all or a positive number, got {choice!r}")
        return k
    hp = _datamodule_hparams(model)
    k = hp.get("turns_per_sample")
    return k if isinstance(k, int) and k >= 1 else None


def _datamodule_hparams(model: str | os.PathLike) -> dict:
    path = Path(model)
    if not (path.is_file() and path.suffix == ".ckpt"):
        return {}
    try:  # mmap: reads the small hyper-parameter dict without pulling the weights into memory
        ckpt = torch.load(path, map_location="cpu", weights_only=False, mmap=True)
    except Exception:  # an older or non-zip checkpoint; load_encoder reports real problems
        return {}
    hp = ckpt.get("datamodule_hyper_parameters") if isinstance(ckpt, dict) else None
    return hp if isinstance(hp, dict) else {}


def _fingerprint(path: Path) -> list[int]:
    files = [path] if path.is_file() else sorted(p for p in path.iterdir() if p.is_file())
    return [sum(f.stat().st_size for f in files), max((f.stat().st_mtime_ns for f in files), default=0)]


def settings(args: argparse.Namespace, urls: list[str], policy: str | None, autocast: str,
             turns_per_sequence: int | None = None) -> dict:
    """What makes a finished sidecar reusable (batch sizes, chunks and process counts do not change it)."""
    model = Path(args.model).resolve()
    return {"model": str(model), "model_fingerprint": _fingerprint(model),
            "shards": [os.path.abspath(u) for u in urls], "top_k": args.top_k, "margin": _margin(args),
            "max_ratio": args.max_ratio, "extra": args.extra, "image_policy": policy or "model",
            "autocast": autocast, "query_turns": "stored order, first candidate query",
            "turns_per_sequence": turns_per_sequence or "all"}


def _margin(args: argparse.Namespace) -> float | None:
    return None if args.margin < 0 else args.margin


def is_complete(out: Path, wanted: dict) -> bool:
    if not (out / MANIFEST).is_file():
        return False
    try:
        return read_sidecar_manifest(out).get("settings") == wanted
    except SidecarError:
        return False


def _device(args: argparse.Namespace) -> torch.device:
    return torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))


def run(args: argparse.Namespace, urls: list[str], num_samples: int | None, policy: str | None,
        device: torch.device, wanted: dict) -> dict | None:
    """One rank's work; returns the summary on rank 0 (None elsewhere)."""
    from muco.data.m3t.collate import PretrainCollator
    from muco.encoder import load_encoder
    from muco.mine.embed import MineStream, embed_queries, embed_texts

    rank, size = world()
    show = rank == 0 and not args.no_progress
    kw = {} if policy is None else {"image_policy": policy}
    autocast = wanted["autocast"]
    encoder = load_encoder(args.model, device=device, autocast_dtype=None if autocast == "none" else autocast,
                           **kw)
    encoder.embedder.eval()
    if rank == 0:
        log.info("model %s on %s (%d process(es)), image policy %s, query turns per sequence: %s", args.model,
                 device, size, encoder.image_policy, wanted["turns_per_sequence"])
    k = wanted["turns_per_sequence"]
    stream = MineStream(urls, PretrainCollator(encoder.tokenizer, encoder.image_policy), encoder.image_policy,
                        args.batch_size, rank, size, None if k == "all" else k)
    total = None if num_samples is None else -(-num_samples // size)
    q = embed_queries(encoder, stream, args.num_workers, total, show)

    # the corpus: every unique target text, sorted (the same order for any process count); a strided share each
    texts = sorted(set().union(*gather_objects({t for ts in q.targets for t in ts})))
    mine = embed_texts(encoder, texts[rank::size], args.batch_size, show)
    corpus = torch.empty(len(texts), encoder.dim)
    for r, part in enumerate(gather_rows(mine)):
        corpus[r::size] = part
    index = {t: i for i, t in enumerate(texts)}
    max_turns = max(gather_objects(max((len(t) for t in q.targets), default=0)))
    pos_idx = torch.tensor([index[t] for ts in q.targets for t in ts], dtype=torch.long)
    same_idx = torch.full((len(pos_idx), max(max_turns, 1)), -1, dtype=torch.long)
    row = 0
    for ts in q.targets:
        same_idx[row : row + len(ts), : len(ts)] = torch.tensor([index[t] for t in ts])
        row += len(ts)
    if device.type == "cuda" and corpus.numel() * 4 < 0.5 * torch.cuda.mem_get_info(device)[0]:
        corpus = corpus.to(device)  # fits: no per-chunk copies
    cfg = SelectConfig(args.top_k, _margin(args), args.max_ratio, args.extra)
    pos_sim, sel = mine_negatives(q.emb, corpus, pos_idx, same_idx, normalized_ids(texts), cfg,
                                  args.query_chunk, args.corpus_chunk, device)

    # to rank 0: per turn (shard, position, turn) + results; per sample the key
    turns = torch.cat([torch.arange(n) for n in q.num_turns.tolist()]) if len(q.keys) else torch.empty(0).long()
    turn_meta = torch.cat([q.order.repeat_interleave(q.num_turns, dim=0), turns[:, None]], 1)
    gathered = [torch.cat(gather_rows(x)) for x in (turn_meta, pos_sim, sel.indices, sel.sims)]
    keys = [k for part in gather_objects(list(zip(q.order.tolist(), q.keys))) for k in part]
    filtered = gather_objects(sel.filtered)
    skipped = sum(gather_objects(q.skipped))
    summary = None
    if rank == 0:
        summary = _write(args, texts, keys, *gathered, {r: sum(f[r] for f in filtered) for r in REASONS},
                         skipped, wanted)
    barrier()
    return summary


def _write(args: argparse.Namespace, texts: list[str], keys: list, meta: torch.Tensor, pos_sim: torch.Tensor,
           indices: torch.Tensor, sims: torch.Tensor, filtered: dict, skipped: int, wanted: dict) -> dict:
    """Rank 0: rows in canonical order (shard, position, stored turn), whatever the process count."""
    key_of = {tuple(o): k for o, k in keys}
    first: dict[str, tuple[int, int]] = {}
    for o in sorted(key_of):
        first.setdefault(key_of[o], o)
    dups = len(key_of) - len(first)
    if dups:
        log.warning("%d sample(s) repeat an earlier key; only the first occurrence of each key is mined", dups)
    meta_l = [tuple(m) for m in meta.tolist()]
    order = [i for i in sorted(range(len(meta_l)), key=meta_l.__getitem__)
             if first[key_of[meta_l[i][:2]]] == meta_l[i][:2]]
    sel = torch.tensor(order, dtype=torch.long)
    summary = summarize(pos_sim[sel], sims[sel], filtered, args.top_k)
    summary.update(samples=len(first), skipped_samples=skipped, duplicate_keys=dups, corpus_texts=len(texts))
    if summary["turns_short"]:
        log.warning("%d of %d query turns kept fewer than %d negatives (a small corpus, or raise --extra / lower "
                    "--margin)", summary["turns_short"], summary["query_turns"], args.top_k)

    def rows() -> Iterator[dict]:
        for i in order:
            s, p, t = meta_l[i]
            idx = [j for j in indices[i].tolist() if j >= 0]
            negs = [{"text": texts[j], "rank": r, "sim": round(v, 6)}
                    for r, (j, v) in enumerate(zip(idx, sims[i].tolist()), 1)]
            yield {"key": key_of[(s, p)], "turn": t, "pos_sim": round(float(pos_sim[i]), 6), "negatives": negs}

    write_sidecar(args.output, rows(), {"model": wanted["model"], "shards": wanted["shards"],
                                        "top_k": args.top_k, "margin": wanted["margin"], "summary": summary,
                                        "settings": wanted})
    return summary


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    shard_set = resolve_shards(args.shards)
    device = _device(args)
    autocast = args.autocast or ("bfloat16" if device.type == "cuda" else "none")
    policy = resolve_image_policy(args.model, args.image_policy)
    wanted = settings(args, shard_set.urls, policy, autocast, resolve_turns_per_sequence(args.model,
                                                                                          args.turns_per_sequence))
    out = Path(args.output)
    # decided before any process starts (and again, identically, by every rank the launcher starts)
    if not args.overwrite and is_complete(out, wanted):
        print(f"muco mine: {out} already holds negatives mined with these settings; --overwrite to mine again")
        return 0
    if args.devices > 1:
        from lightning.fabric import Fabric

        fabric = Fabric(accelerator="cuda" if device.type == "cuda" else "cpu", devices=args.devices,
                        strategy="ddp")
        fabric.launch()
        device = fabric.device
    elif device.type == "cuda" and device.index is not None:
        torch.cuda.set_device(device)
    summary = run(args, shard_set.urls, shard_set.num_samples, policy, device, wanted)
    if summary is not None:
        log.info("wrote %s", out / MANIFEST)
        print(json.dumps(summary, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
