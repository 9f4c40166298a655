"""Throughput of the M3T ``MuCoDataModule`` against bare decode + resize on the same shards and workers.

DataModule path: tar -> JPEG decode -> policy resize (``ImagePolicy.prepare``) -> record validation -> turn
drawing -> templates -> tokenisation -> uint8 patches (``patchify``; normalisation happens later, on the
device, in ``Embedder``) -> collation, in the DataLoader workers: the real train loader, unmodified.
Bare path: webdataset ``decode("pil")`` -> one resize to the policy's target size -> uint8 tensor.
Both use the same shards, worker count and ``batch_size=None`` loaders; timing starts at the first item,
so worker start-up is excluded; each path runs ``--repeats`` times, alternating, and its best run counts
(the build machines' throughput is noisy). Worker CPU time per sample is reported too (``cpu_ratio``): it
barely depends on other jobs sharing the machine. The last line reads
``ratio=<DataModule samples/s / bare samples/s>``.

    python benchmarks/bench_loader.py --count 512 --workers 2 --policy pretrain [--profile]
"""

from __future__ import annotations

import argparse
import cProfile
import gc
import io
import json
import pstats
import random
import resource
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
import webdataset as wds
from PIL import Image
from torch.utils.data import DataLoader

from muco.data.datamodule import MuCoDataModule
from muco.data.shards import ShardWriter, write_manifest
from muco.data.tar_reader import TarReader
from muco.inputs.image_policy import ImagePolicy

PHOTOS = ("astronaut", "coffee", "chelsea", "rocket", "hubble_deep_field", "immunohistochemistry", "retina",
          "stereo_motorcycle", "cat", "colorwheel", "camera", "coins", "moon", "text", "page", "grass")
ASPECTS = (1.0, 4 / 3, 3 / 2, 16 / 9, 3 / 4, 2 / 3)


def photo_pool(n: int, short: tuple[int, int], seed: int = 0) -> list[bytes]:
    """``n`` JPEGs (q90) cut from scikit-image's bundled photos at pretraining-like sizes."""
    from skimage import data

    rng = random.Random(seed)
    base = []
    for name in PHOTOS:
        arr = getattr(data, name)()
        arr = arr[0] if isinstance(arr, tuple) else arr
        base.append(Image.fromarray(np.asarray(arr)).convert("RGB"))
    out = []
    for i in range(n):
        im = base[i % len(base)]
        aspect, side = rng.choice(ASPECTS), rng.randint(*short)
        w, h = (round(side * aspect), side) if aspect >= 1 else (side, round(side / aspect))
        # a random crop with the target aspect, then an up/down-scale to the target size
        cw = min(im.width, round(im.height * w / h))
        ch = min(im.height, round(cw * h / w))
        x, y = rng.randint(0, im.width - cw), rng.randint(0, im.height - ch)
        crop = im.crop((x, y, x + cw, y + ch)).resize((w, h), Image.Resampling.BICUBIC)
        buf = io.BytesIO()
        crop.save(buf, format="JPEG", quality=90)
        out.append(buf.getvalue())
    return out


def write_shards(root: Path, count: int, per_shard: int, short: tuple[int, int]) -> Path:
    images = photo_pool(min(count, 128), short)
    with ShardWriter(str(root / "bench-%06d.tar"), max_samples=per_shard) as w:
        for i in range(count):
            turns = [{"task": "vqa", "queries": [f"What detail {t} is visible in region {i}?",
                                                 f"Describe aspect {t} of the scene {i}."],
                      "target": f"An answer of a few words for turn {t} of image {i}."} for t in range(7)]
            rec = {"turns": turns, "caption": f"A dense caption of image {i} " * 8}
            w.write(f"s{i:06d}", [("jpg", images[i % len(images)]), ("json", json.dumps(rec).encode())])
    return write_manifest(root / "manifest.json", w.shards, turns=7)


class BareResize:
    """Module-level callable (picklable): decode's PIL image -> the policy's target size -> uint8 tensor."""

    def __init__(self, policy: ImagePolicy) -> None:
        self.policy = policy

    def __call__(self, sample: dict) -> torch.Tensor:
        im = sample["jpg"]
        size, resample = self.policy.target(*im.size)
        return torch.from_numpy(np.array(im.resize(size, resample)))


def children_cpu() -> float:
    r = resource.getrusage(resource.RUSAGE_CHILDREN)
    return r.ru_utime + r.ru_stime


def timed(make_loader: Callable[[], DataLoader], count_fn: Callable[[Any], int]) -> tuple[float, float]:
    """(samples/s after the first item, worker CPU ms per sample over the whole run).

    The CPU figure is the workers' user + system time, counted once they are joined at the end (hence the
    loader is made here and dropped before reading it); other jobs on a shared machine barely move it,
    unlike the wall-clock rate."""
    cpu0 = children_cpu()
    loader = make_loader()
    it = iter(loader)
    first = count_fn(next(it))  # worker start-up and the first item are not timed
    t0, n = time.perf_counter(), 0
    for item in it:
        n += count_fn(item)
    dt = time.perf_counter() - t0
    del it, loader  # shuts down and joins the (possibly persistent) workers
    gc.collect()
    return n / dt, 1000 * (children_cpu() - cpu0) / (n + first)


def bench_bare(manifest: Path, policy: ImagePolicy, workers: int) -> tuple[float, float]:
    shards = [str(manifest.parent / s["name"]) for s in json.loads(manifest.read_text())["shards"]]
    ds = (wds.WebDataset(shards, shardshuffle=False, nodesplitter=None, workersplitter=wds.split_by_worker)
          .decode("pil").map(BareResize(policy)))
    return timed(lambda: DataLoader(ds, batch_size=None, num_workers=workers), lambda _: 1)


def bench_datamodule(manifest: Path, args: argparse.Namespace) -> tuple[float, float]:
    dm = MuCoDataModule(str(manifest), batch_size=args.batch_size, num_workers=args.workers, resampled=False,
                       shuffle_buffer=64, tokenizer=args.tokenizer, image_policy=args.policy)
    dm.setup("fit")
    return timed(dm.train_dataloader, lambda b: len(b["keys"]))


def profile(manifest: Path, args: argparse.Namespace) -> None:
    """cProfile of the DataModule's per-sample and per-batch work in this process."""
    dm = MuCoDataModule(str(manifest), batch_size=args.batch_size, num_workers=0, resampled=False,
                       tokenizer=args.tokenizer, image_policy=args.policy)
    dm.setup("fit")
    ds = dm.make_dataset("train")
    read = TarReader(lambda url, key, reason: None)
    raws = [r for url in ds.cfg.sources[0][:4] for r in read(url, "prof")]
    prof = cProfile.Profile()
    prof.enable()
    for i in range(0, len(raws) - args.batch_size + 1, args.batch_size):
        ds.collate([ds.decode(r, 0) for r in raws[i : i + args.batch_size]])
    prof.disable()
    pstats.Stats(prof).sort_stats("cumulative").print_stats(25)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--count", type=int, default=512, help="samples to write and read")
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--policy", default="pretrain", help="ImagePolicy preset")
    p.add_argument("--tokenizer", default="tiny")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--per-shard", type=int, default=32)
    p.add_argument("--short-side", type=int, nargs=2, default=(560, 720), help="range of image short sides")
    p.add_argument("--repeats", type=int, default=2, help="runs per path, alternating; the best counts")
    p.add_argument("--profile", action="store_true", help="print a cProfile of the DataModule's work")
    args = p.parse_args(argv)
    policy = ImagePolicy.preset(args.policy)
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        manifest = write_shards(Path(tmp), args.count, args.per_shard, tuple(args.short_side))
        print(f"wrote {args.count} samples ({args.short_side[0]}-{args.short_side[1]} px short side) in "
              f"{time.perf_counter() - t0:.1f} s; policy={args.policy} workers={args.workers} "
              f"batch={args.batch_size} tokenizer={args.tokenizer} torch_threads={torch.get_num_threads()}")
        if args.profile:
            profile(manifest, args)
        bare = full = 0.0
        bare_cpu = full_cpu = float("inf")
        for _ in range(args.repeats):
            rate, cpu = bench_bare(manifest, policy, args.workers)
            bare, bare_cpu = max(bare, rate), min(bare_cpu, cpu)
            rate, cpu = bench_datamodule(manifest, args)
            full, full_cpu = max(full, rate), min(full_cpu, cpu)
        per = max(1, args.workers)
        print(f"bare decode + resize: {bare:.1f} samples/s ({bare / per:.1f} per worker), "
              f"{bare_cpu:.1f} worker-CPU ms/sample")
        print(f"MuCoDataModule:       {full:.1f} samples/s ({full / per:.1f} per worker), "
              f"{full_cpu:.1f} worker-CPU ms/sample")
        # the same ratio from CPU time: what the wall-clock one tends to on an otherwise idle machine
        print(f"cpu_ratio={bare_cpu / full_cpu:.2f}")
    print(f"ratio={full / bare:.2f}")


if __name__ == "__main__":
    main()
