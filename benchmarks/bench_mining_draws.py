"""Mining matches training (issue 16, part 4): how much do the mined negatives move between the canonical query
turns (stored order, first candidate query) and the draws training makes in a given data epoch, and between
two epochs' draws?

Builds the demo digit shards, trains the tiny model for a few steps (``muco fit --config configs/tiny.yaml``;
``--model`` skips it), mines the chosen split with ``query_draws="canonical"`` and with the training draws of
epochs 0, 1, 2 (the checkpoint's data seed and ``turns_per_sample``), and prints, per pair of sidecars, the
per-(key, stored turn) overlap of the top-k negatives, the mean absolute rank change of the negatives both keep
and the share of turns whose hardest negative is the same (:func:`muco.mine.stability.rank_movement`).

    python benchmarks/bench_mining_draws.py                      # demo val split (297 samples), ~1.5 min on 2 CPUs
    python benchmarks/bench_mining_draws.py --split train --turns-per-sequence 3
    python benchmarks/bench_mining_draws.py --model runs/tiny/checkpoints/last.ckpt --data data/demo
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from muco.data.shards import resolve_shards  # noqa: E402
from muco.mine.pipeline import (  # noqa: E402
    MineConfig,
    mine,
    resolve_draw_seed,
    resolve_image_policy,
    resolve_turns_per_sequence,
)
from muco.mine.stability import movement_table, rank_movement  # noqa: E402


def train_tiny(data: Path, run: Path, steps: int) -> Path:
    """A few steps of the tiny CPU config on the demo shards; the last checkpoint."""
    cmd = [sys.executable, "-m", "muco", "fit", "--config", str(REPO / "configs" / "tiny.yaml"),
           f"--trainer.max_steps={steps}", "--trainer.enable_progress_bar=false", "--trainer.limit_val_batches=0",
           "--trainer.default_root_dir", str(run), "--data.init_args.train_shards", str(data / "train/manifest.json"),
           "--data.init_args.val_shards", str(data / "val/manifest.json")]
    res = subprocess.run(cmd, cwd=run.parent, capture_output=True, text=True)
    if res.returncode != 0:
        raise SystemExit(f"muco fit failed:\n{res.stderr[-3000:]}")
    return run / "checkpoints" / "last.ckpt"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default=None, help="a muco .ckpt (default: train the tiny model for --fit-steps)")
    p.add_argument("--data", default=None, help="the demo data directory (default: built in a temporary one)")
    p.add_argument("--split", default="val", choices=["train", "val"])
    p.add_argument("--fit-steps", type=int, default=20)
    p.add_argument("--epochs", type=int, nargs="+", default=[0, 1, 2], help="data epochs whose draws to mine")
    p.add_argument("--turns-per-sequence", default="train", help="train (the checkpoint's K), all, or a number")
    p.add_argument("--top-k", type=int, default=30)
    p.add_argument("--margin", type=float, default=0.05, help="negative: off")
    p.add_argument("--k", type=int, default=10, help="the top-k compared")
    args = p.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        tmp_path = Path(tmp)
        t0 = time.perf_counter()
        if args.data is None:
            from muco.demo.build import build_demo_data

            data = build_demo_data(tmp_path / "demo")
        else:
            data = Path(args.data)
        model = Path(args.model) if args.model else train_tiny(data, tmp_path / "run", args.fit_steps)
        t_fit = time.perf_counter() - t0
        shard_set = resolve_shards([str(data / args.split / "manifest.json")])
        seed, order = resolve_draw_seed(model)
        tps = args.turns_per_sequence if args.turns_per_sequence in ("train", "all") else int(args.turns_per_sequence)
        k = resolve_turns_per_sequence(model, tps)
        base = dict(model=str(model), shards=tuple(shard_set.urls), top_k=args.top_k,
                    margin=None if args.margin < 0 else args.margin, image_policy=resolve_image_policy(model, "train"),
                    turns_per_sequence=k, num_workers=0, num_samples=shard_set.num_samples, progress=False)
        runs = {"canonical": {}} | {f"epoch {e}": {"query_draws": "train", "draw_seed": seed, "draw_epoch": e,
                                                    "turn_order": order} for e in args.epochs}
        sidecars, times, summaries = {}, {}, {}
        for name, draws in runs.items():
            out = tmp_path / name.replace(" ", "")
            t = time.perf_counter()
            summaries[name] = mine(MineConfig(output=out, **base, **draws), "cpu")
            times[name], sidecars[name] = time.perf_counter() - t, out
        pairs = [("canonical", f"epoch {e}") for e in args.epochs]
        pairs += [(f"epoch {a}", f"epoch {b}") for a, b in zip(args.epochs, args.epochs[1:])]
        rows = {f"{a} vs {b}": rank_movement(sidecars[a], sidecars[b], args.k) for a, b in pairs}

    s = summaries["canonical"]
    print(f"model {'given' if args.model else f'tiny, {args.fit_steps} steps'} ({t_fit:.0f} s), demo {args.split}: "
          f"{s['samples']} samples, {s['query_turns']} query turns, {s['corpus_texts']} corpus texts; data seed "
          f"{seed}, turn order {order}, K = {k or 'all'}; top_k {args.top_k}, margin {args.margin}")
    print("mining seconds: " + ", ".join(f"{n} {t:.1f}" for n, t in times.items()))
    print("mean pos sim / mean neg sim: " + ", ".join(
        f"{n} {v['mean_pos_sim']:.4f}/{v['mean_neg_sim']:.4f}" for n, v in summaries.items()))
    print(movement_table(rows, args.k))


if __name__ == "__main__":
    main()
