"""GradCache (``model.grad_cache_chunk``): peak memory and time of one pretraining step vs chunk size, at a
fixed batch, each setting in its own process, side by side in one run (these machines are noisy).

    python benchmarks/bench_grad_cache.py                      # 16 images x 7 turns, chunks none/8/4/2
    python benchmarks/bench_grad_cache.py --images 32 --chunks 0 16 8 --repeats 3

Peak memory is the growth of the process's resident peak (VmHWM) over one forward+backward step, after a
warm-up step, so it counts the step's activations and temporaries (not the weights). Prints ratios against the
unchunked step (chunk 0). The model is the tiny random-init Qwen2-VL with a LoRA adapter (CPU).
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import statistics
import time
from typing import Any


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


def measure(chunk: int, images: int, turns: int, repeats: int) -> dict[str, float]:
    """Median step time and peak memory growth of one setting, in this (child) process."""
    import numpy as np
    import torch
    from PIL import Image
    from skimage import data

    from muco.data.m3t.collate import PretrainCollator, PretrainSample
    from muco.inputs.image_policy import ImagePolicy
    from muco.inputs.tokenizer import tiny_tokenizer
    from muco.model.backbone import AdapterConfig, BackboneConfig
    from muco.train.grad_cache import grad_cache_step
    from muco.train.module import MuCoModule

    torch.set_num_threads(1)
    torch.manual_seed(0)
    photos = [Image.fromarray(np.asarray(getattr(data, n)())).convert("RGB")
              for n in ("astronaut", "chelsea", "coffee", "rocket")]
    samples = [PretrainSample(f"s{i}", photos[i % 4], [f"question {t} about picture {i} and its details" for t in
                                                       range(turns)],
                              [f"answer {t} of picture {i}" for t in range(turns)]) for i in range(images)]
    batch = PretrainCollator(tiny_tokenizer(), ImagePolicy.preset("tiny"))(samples)
    m = MuCoModule(backbone=BackboneConfig(preset="tiny", adapter=AdapterConfig(r=8, alpha=16)))

    def step() -> None:
        m.zero_grad(set_to_none=True)
        if chunk:
            grad_cache_step(m.embedder, m.objective, batch, m.temperature(), 0, chunk)
        else:
            m.objective.step(m.embedder, batch, m.temperature(), 0).loss.backward()

    step()  # warm-up: allocator pools, gradient buffers
    times, peaks = [], []
    for _ in range(repeats):
        m.zero_grad(set_to_none=False)  # keep the gradient buffers: they are not the step's activations
        _reset_hwm()
        base = _hwm_kb()
        t0 = time.perf_counter()
        step()
        times.append(time.perf_counter() - t0)
        peaks.append((_hwm_kb() - base) / 1024)
    return {"time_s": statistics.median(times), "peak_mib": statistics.median(peaks)}


def _child(args: tuple[int, int, int, int], out: Any) -> None:
    out.put(measure(*args))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--images", type=int, default=16)
    ap.add_argument("--turns", type=int, default=7)
    ap.add_argument("--chunks", type=int, nargs="+", default=[0, 8, 4, 2], help="0: unchunked")
    ap.add_argument("--repeats", type=int, default=3)
    a = ap.parse_args()
    ctx = mp.get_context("spawn")
    rows = {}
    for chunk in a.chunks:
        q = ctx.Queue()
        p = ctx.Process(target=_child, args=((chunk, a.images, a.turns, a.repeats), q))
        p.start()
        rows[chunk] = q.get()
        p.join()
    base = rows.get(0) or next(iter(rows.values()))
    print(f"pretraining step, {a.images} images x {a.turns} turns, tiny Qwen2-VL + LoRA, 1 thread, "
          f"median of {a.repeats}")
    print(f"{'chunk':>8} {'step s':>8} {'x time':>7} {'peak MiB':>9} {'x peak':>7}")
    for chunk, r in rows.items():
        print(f"{chunk or 'none':>8} {r['time_s']:8.3f} {r['time_s'] / base['time_s']:7.2f} "
              f"{r['peak_mib']:9.1f} {r['peak_mib'] / max(base['peak_mib'], 1e-9):7.2f}")


if __name__ == "__main__":
    main()
