"""GradCache (``model.grad_cache_chunk``): peak memory and time of one pretraining step vs chunk size, at a
fixed batch, each setting in its own process, side by side in one run (these machines are noisy).

    python benchmarks/bench_grad_cache.py                      # 16 images x 7 turns, chunks none/8/4/2
    python benchmarks/bench_grad_cache.py --images 32 --chunks 0 16 8 --repeats 3

Peak memory is the growth of the process's resident peak (VmHWM) over one forward+backward step, after a
warm-up step, so it counts the step's activations and temporaries (not the weights). Prints ratios against the
unchunked step (chunk 0). The model is the tiny random-init Qwen2-VL with a LoRA adapter (CPU).

On a GPU (``--device cuda``, as ``gpu_check.sh`` runs it) the settings share one process and one model: peak
memory is ``torch.cuda.max_memory_allocated`` over the step minus what was allocated before it (again the
step's activations and temporaries), times are synchronised wall times. ``--preset 2b`` is the 2B recipe's
backbone (random init, frozen base in ``--dtype``, LoRA r=64, gradient checkpointing, bf16 autocast with
``--bf16``) on M3T-shaped samples (``_shapes``: photos at the pretraining resolution, 7 turns drawn as in
training, the Qwen2 vocabulary).

    python benchmarks/bench_grad_cache.py --device cuda --preset 2b --bf16 --dtype bfloat16 --images 32 \
        --chunks 0 16 8 4
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import statistics
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))


def _hwm_kb() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1])
    raise RuntimeError("no VmHWM in /proc/self/status")


def _reset_hwm() -> None:
    # "5" resets VmHWM to the current resident size (Linux)
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


def _to(x: Any, device: Any) -> Any:
    import torch

    if isinstance(x, torch.Tensor):
        return x.to(device)
    if isinstance(x, dict):
        return {k: _to(v, device) for k, v in x.items()}
    return x


def build(images: int, turns: int, preset: str = "tiny", device: str = "cpu", dtype: str = "float32",
          m3t: bool | None = None, policy: str = "pretrain") -> tuple:
    """(module on ``device``, one collated batch on ``device``) of a setting; ``m3t`` (default: preset not tiny):
    M3T-shaped samples at ``policy``, the Qwen2 vocabulary and the recipe's backbone settings."""
    import numpy as np
    import torch
    from PIL import Image
    from skimage import data

    from muco.data.m3t.collate import PretrainCollator, PretrainSample
    from muco.inputs.image_policy import ImagePolicy
    from muco.inputs.tokenizer import qwen_offline_tokenizer, tiny_tokenizer
    from muco.model.backbone import AdapterConfig, BackboneConfig
    from muco.train.module import MuCoModule

    torch.manual_seed(0)
    if not (preset != "tiny" if m3t is None else m3t):
        photos = [Image.fromarray(np.asarray(getattr(data, n)())).convert("RGB")
                  for n in ("astronaut", "chelsea", "coffee", "rocket")]
        samples = [PretrainSample(f"s{i}", photos[i % 4], [f"question {t} about picture {i} and its details"
                                                           for t in range(turns)],
                                  [f"answer {t} of picture {i}" for t in range(turns)]) for i in range(images)]
        batch = PretrainCollator(tiny_tokenizer(), ImagePolicy.preset("tiny"))(samples)
        m = MuCoModule(backbone=BackboneConfig(preset="tiny", adapter=AdapterConfig(r=8, alpha=16), dtype=dtype))
    else:  # M3T shapes at the pretraining resolution, the recipe's backbone settings (configs/m3t_2b.yaml)
        from _shapes import m3t_record
        from _shapes import photos as shape_photos

        from muco.data.m3t.turns import draw_turns
        from muco.data.seeds import sample_rng

        pol = ImagePolicy.preset(policy)
        pics = shape_photos(pol.short_side or 640)
        samples = []
        for i in range(images):
            name, im = pics[i % len(pics)]
            queries, targets = draw_turns(m3t_record(i)["turns"], turns, sample_rng(0, 0, f"{name}-{i}"))
            samples.append(PretrainSample(f"{name}-{i}", im, queries, targets))
        batch = PretrainCollator(qwen_offline_tokenizer(), pol)(samples)
        m = MuCoModule(tokenizer="qwen-offline", backbone=BackboneConfig(
            preset=preset, adapter=AdapterConfig(r=64, alpha=64), dtype=dtype, gradient_checkpointing=True))
    return m.to(device), _to(batch, device)


def measure(chunk: int, images: int, turns: int, repeats: int, preset: str = "tiny", device: str = "cpu",
            bf16: bool = False, dtype: str = "float32", built: tuple | None = None, m3t: bool | None = None,
            policy: str = "pretrain") -> dict[str, float]:
    """Median step time and peak memory growth of one setting: on CPU in this (child) process (VmHWM), on CUDA
    from the allocator's peak (``built``: a (module, batch) to reuse)."""
    import torch

    from muco.train.grad_cache import grad_cache_step

    cuda = device.startswith("cuda")
    if not cuda:
        torch.set_num_threads(1)
    m, batch = built or build(images, turns, preset, device, dtype, m3t, policy)

    def step() -> None:
        with torch.autocast("cuda" if cuda else "cpu", dtype=torch.bfloat16, enabled=bf16):
            if chunk:
                grad_cache_step(m.embedder, m.objective, batch, m.temperature(), 0, chunk)
            else:
                m.objective.step(m.embedder, batch, m.temperature(), 0).loss.backward()

    def sync() -> None:
        if cuda:
            torch.cuda.synchronize(device)

    m.zero_grad(set_to_none=True)
    step()  # warm-up: allocator pools, gradient buffers
    times, peaks = [], []
    for _ in range(repeats):
        m.zero_grad(set_to_none=False)  # keep the gradient buffers: they are not the step's activations
        sync()
        if cuda:
            torch.cuda.reset_peak_memory_stats(device)
            base = torch.cuda.memory_allocated(device)
        else:
            _reset_hwm()
            base = _hwm_kb() * 1024
        t0 = time.perf_counter()
        step()
        sync()
        times.append(time.perf_counter() - t0)
        top = torch.cuda.max_memory_allocated(device) if cuda else _hwm_kb() * 1024
        peaks.append((top - base) / 2**20)
    return {"time_s": statistics.median(times), "peak_mib": statistics.median(peaks)}


def _child(args: tuple, out: Any) -> None:
    out.put(measure(*args))


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--images", type=int, default=16)
    ap.add_argument("--turns", type=int, default=7)
    ap.add_argument("--chunks", type=int, nargs="+", default=[0, 8, 4, 2], help="0: unchunked")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--device", default="cpu", help="cpu (each setting in its own process) | cuda (one process)")
    ap.add_argument("--preset", default="tiny", help="tiny, or a Qwen2-VL preset (2b) at M3T shapes")
    ap.add_argument("--bf16", action="store_true", help="bf16 autocast (as trainer.precision bf16-mixed)")
    ap.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"), help="backbone weights dtype")
    ap.add_argument("--m3t", action=argparse.BooleanOptionalAction, default=None,
                    help="M3T-shaped samples, Qwen2 vocabulary, the recipe's backbone (default: preset is not tiny)")
    ap.add_argument("--policy", default="pretrain", help="image policy of the M3T samples")
    a = ap.parse_args(argv)
    rows = {}
    if a.device.startswith("cuda"):
        built = build(a.images, a.turns, a.preset, a.device, a.dtype, a.m3t, a.policy)
        for chunk in a.chunks:
            rows[chunk] = measure(chunk, a.images, a.turns, a.repeats, a.preset, a.device, a.bf16, a.dtype, built,
                                  a.m3t, a.policy)
            print(f"chunk {chunk or 'none'}: {rows[chunk]}", flush=True)
    else:
        ctx = mp.get_context("spawn")
        for chunk in a.chunks:
            q = ctx.Queue()
            p = ctx.Process(target=_child, args=((chunk, a.images, a.turns, a.repeats, a.preset, a.device, a.bf16,
                                                  a.dtype, None, a.m3t, a.policy), q))
            p.start()
            rows[chunk] = q.get()
            p.join()
    base = rows.get(0) or next(iter(rows.values()))
    where = (f"{a.device}, peak = max_memory_allocated growth" if a.device.startswith("cuda")
             else "cpu, 1 thread, peak = VmHWM growth")
    print(f"pretraining step, {a.images} images x {a.turns} turns, {a.preset} Qwen2-VL + LoRA, {where}, "
          f"bf16={a.bf16} dtype={a.dtype}, median of {a.repeats}")
    print(f"{'chunk':>8} {'step s':>8} {'x time':>7} {'peak MiB':>9} {'x peak':>7}")
    for chunk, r in rows.items():
        print(f"{chunk or 'none':>8} {r['time_s']:8.3f} {r['time_s'] / base['time_s']:7.2f} "
              f"{r['peak_mib']:9.1f} {r['peak_mib'] / max(base['peak_mib'], 1e-9):7.2f}")


if __name__ == "__main__":
    main()
