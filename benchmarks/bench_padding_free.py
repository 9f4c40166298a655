"""Padding-free (packed) vs padded training steps, side by side on one model and the same batches.

One backbone built with ``padding_free`` (``muco.model.packing``: its language model runs SDPA sequence by
sequence on a packed row, and exactly as ``sdpa`` on a padded batch) is wrapped twice: an ``Embedder`` that pads
and one that packs. Each repetition runs the same M3T-shaped batch (``_shapes``: real photos at the pretraining
resolution, 7 turns drawn as in training, the Qwen2 vocabulary) through both, in alternating order, as
forward + backward of the pretraining loss without an optimizer step, so both always see the same weights. It
prints per mode the median step time and the token efficiency of the batches, the median paired time ratio,
and the largest difference of the embeddings (the two paths compute the same function).

Timing follows ``bench_turns``: one intra-op thread and process CPU time by default (a shared machine);
``--device cuda --attn flash_attention_2 --bf16`` measures flash-attention's varlen kernel against its padded one.

    python benchmarks/bench_padding_free.py                       # cpu-2b-shape, 8 images x 7 turns, ~3 min
    python benchmarks/bench_padding_free.py --preset tiny --images 16
"""

from __future__ import annotations

import argparse
import gc
import statistics
import sys
import time
import warnings
from dataclasses import replace
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _shapes import m3t_record, photos  # noqa: E402
from bench_turns import (  # noqa: E402
    PhaseClock,
    default_lora_r,
    keep_freed_memory,
    make_samples,
    to_device,
    train_step,
)

from muco.data.m3t.collate import PretrainCollator  # noqa: E402
from muco.inputs.image_policy import ImagePolicy  # noqa: E402
from muco.inputs.tokenizer import SpecialTokenIds, qwen_offline_tokenizer  # noqa: E402
from muco.model import backbone as backbone_mod  # noqa: E402
from muco.model.backbone import AdapterConfig, BackboneConfig, build_backbone  # noqa: E402
from muco.model.embedder import Embedder  # noqa: E402
from muco.objectives.base import sequence_counts  # noqa: E402

MODES = ("padded", "packed")


def main(argv: list[str] | None = None) -> float:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--preset", default="cpu-2b-shape", choices=sorted(backbone_mod.PRESETS))
    ap.add_argument("--images", type=int, default=8, help="images per batch (x --turns query/target pairs)")
    ap.add_argument("--turns", type=int, default=7)
    ap.add_argument("--reps", type=int, default=4, help="timed steps per mode (after one warm-up step each)")
    ap.add_argument("--short-side", type=int, default=None, help="override the pretraining policy's short side")
    ap.add_argument("--grad-ckpt", action="store_true", help="gradient checkpointing, as the recipe configs train")
    ap.add_argument("--bf16", action="store_true", help="bf16 autocast for the forward")
    ap.add_argument("--attn", default="sdpa", choices=("sdpa", "flash_attention_2"))
    ap.add_argument("--threads", type=int, default=1, help="torch intra-op threads (0: torch's default)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    device = torch.device(args.device)
    warnings.filterwarnings("ignore", category=FutureWarning)
    if args.threads:
        torch.set_num_threads(args.threads)
    keep_freed_memory()
    now = time.process_time
    if device.type == "cuda":
        def now() -> float:
            torch.cuda.synchronize(device)
            return time.perf_counter()
    torch.manual_seed(args.seed)

    policy = ImagePolicy.preset("pretrain")
    if args.short_side is not None:
        policy = replace(policy, short_side=args.short_side)
    pics = photos(policy.short_side or 640)
    records = [m3t_record(args.seed * 1000 + i) for i in range(args.images)]  # batch slot i: record i
    tok = qwen_offline_tokenizer()
    lora_r = default_lora_r(args.preset)
    cfg = BackboneConfig(preset=args.preset, adapter=AdapterConfig(r=lora_r, alpha=lora_r), seed=args.seed,
                         gradient_checkpointing=args.grad_ckpt, attn_implementation=args.attn, padding_free=True)
    backbone = build_backbone(cfg, tok)
    emb_id = SpecialTokenIds.from_tokenizer(tok).emb
    embedders = {"padded": Embedder(backbone, emb_id), "packed": Embedder(backbone, emb_id, padding_free=True)}
    for e in embedders.values():
        e.to(device).train()
    clock = PhaseClock(backbone, now)
    collator = PretrainCollator(tok, policy)
    print(f"preset={args.preset} images/batch={args.images} turns={args.turns} reps={args.reps} "
          f"short_side={policy.short_side} attn={args.attn} grad_ckpt={args.grad_ckpt} bf16={args.bf16} "
          f"threads={torch.get_num_threads()} device={device}")

    def samples_for(rep: int) -> list:
        idx = [(rep * args.images + i) % len(pics) for i in range(args.images)]
        keys = [f"{pics[i][0]}-{rep}-{j}" for j, i in enumerate(idx)]
        return make_samples(records, [pics[i][1] for i in idx], keys, args.turns, args.seed, rep)

    def embed(mode: str, samples: list) -> torch.Tensor:
        batch = to_device(collator(samples), device)
        with torch.no_grad(), torch.autocast(device.type, dtype=torch.bfloat16, enabled=args.bf16):
            return embedders[mode](batch["query"], batch["num_turns"], batch["keys"]).emb

    check = samples_for(-2)
    max_diff = (embed("padded", check) - embed("packed", check)).abs().max().item()
    for mode in MODES:  # warm-up, not counted
        train_step(embedders[mode], collator, samples_for(-1), None, clock, args.bf16, device)
    times: dict[str, list[float]] = {m: [] for m in MODES}
    efficiency: list[float] = []
    for rep in range(args.reps):
        samples = samples_for(rep)
        for mode in MODES if rep % 2 == 0 else MODES[::-1]:
            gc.collect()
            phases, batch, _ = train_step(embedders[mode], collator, samples, None, clock, args.bf16, device)
            times[mode].append(sum(v for k, v in phases.items() if k != "collate"))
        tokens, positions = sequence_counts([batch["query"], batch["target"]])
        efficiency.append(tokens / positions)

    print(f"\ntoken efficiency of the batches (real tokens / padded positions): {statistics.mean(efficiency):.3f}")
    print(f"{'mode':<8}{'step s':>9}{'computed positions':>20}")
    for mode in MODES:
        share = 1.0 if mode == "padded" else statistics.mean(efficiency)
        print(f"{mode:<8}{statistics.median(times[mode]):>9.3f}{share:>20.3f}")
    ratio = statistics.median(p / q for p, q in zip(times["padded"], times["packed"]))
    print(f"(step s: forward + backward without collation, median; max |embedding difference| {max_diff:.2e})")
    print(f"speedup padded/packed={ratio:.3f}")
    return ratio


if __name__ == "__main__":
    main()
