"""Throughput of ``muco data convert`` (M3T parquet -> shards) with 0 (in-process), 1 and 2 workers, side by side.

Builds an M3T-shaped parquet in a temporary directory: ``--rows`` rows of 7 turns (3 query candidates of 15-25
words each, a short answer; a caption of ~100 words), each row with its own JPEG (q90, ``--size``, default
500x400) cut from scikit-image's bundled photos at a random place and scale, so that decoding costs what a real
photo costs. Then converts it once per worker count with the real converter (``convert_parquet``: full decode of
every image, record validation, tar writing, sha256, the journal), and reports per run:

- ``rows/s``: rows over the wall time of the whole call (pool start-up included: spawned workers import muco);
- ``steady``: rows/s between the first and the last converted row (start-up excluded);
- ``per core``: ``steady`` per process that prepares rows (the converter itself with 0 workers, else each
  worker), what one core converts once running;
- ``cpu ms/row``: CPU time of the converter and its workers per row (start-up included), and of the writer (the
  main process: parquet reading, pickling, tar writing, sha256) alone.

The last lines project M3T's 5,103,183 rows: one core at the best ``per core`` rate, and a 32-core node at 32
times that, which holds while one writer keeps up (its ceiling, 1 / writer CPU per row, is printed; past it, run
several ``--part`` conversions per node). Timings on a shared machine are noisy: ``--repeats`` keeps the best.

    python benchmarks/bench_convert.py [--rows 2000] [--workers 0 1 2] [--size 500x400] [--repeats 1]
"""

from __future__ import annotations

import argparse
import io
import random
import resource
import shutil
import tempfile
import time
from datetime import timedelta
from pathlib import Path

import numpy as np
from PIL import Image

from muco.convert.m3t import convert_parquet
from muco.convert.pipeline import Progress

M3T_ROWS = 5_103_183
NODE_CORES = 32
PHOTOS = ("astronaut", "coffee", "chelsea", "rocket", "hubble_deep_field", "immunohistochemistry", "retina",
          "stereo_motorcycle", "cat", "camera", "coins", "moon")
TASKS = ("cls", "vqa_global", "vqa_global", "vqa_local", "vqa_local", "vqa_creative", "ret")
WORDS = ("the a photo of man woman dog cat street car tree sky building table red blue green small large two "
         "three people standing sitting holding next to near under wooden old new bright dark water field").split()


def sentence(rng: random.Random, lo: int, hi: int) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(rng.randint(lo, hi))).capitalize() + "."


def build(directory: Path, rows: int, size: tuple[int, int], seed: int = 0) -> Path:
    """The parquet and its images under ``directory``; returns the parquet's path."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    from skimage import data

    rng = random.Random(seed)
    base = []
    for name in PHOTOS:
        arr = getattr(data, name)()
        arr = arr[0] if isinstance(arr, tuple) else arr
        if arr.dtype == bool:
            arr = arr.astype(np.uint8) * 255
        base.append(Image.fromarray(np.asarray(arr)).convert("RGB"))
    images = directory / "images"
    images.mkdir(parents=True)
    w, h = size
    table = []
    for r in range(rows):
        im = base[r % len(base)]
        scale = max(w / im.width, h / im.height) * rng.uniform(1.0, 1.6)
        big = im.resize((max(w, round(im.width * scale)), max(h, round(im.height * scale))), Image.Resampling.BILINEAR)
        x, y = rng.randint(0, big.width - w), rng.randint(0, big.height - h)
        buf = io.BytesIO()
        big.crop((x, y, x + w, y + h)).save(buf, format="JPEG", quality=90)
        rel = f"{r // 1000:03d}/{r:07d}.jpg"
        (images / rel).parent.mkdir(exist_ok=True)
        (images / rel).write_bytes(buf.getvalue())
        table.append({
            "qry": [[f"<|image_1|>\n{sentence(rng, 15, 25)}" for _ in range(3)] for _ in TASKS],
            "pos_text": [sentence(rng, 3, 12) if t != "ret" else sentence(rng, 80, 120) for t in TASKS],
            "qry_image_path": rel,
            "qry_sentence": sentence(rng, 80, 120),
        })
    path = directory / "M3T.parquet"
    pq.write_table(pa.Table.from_pylist(table), path, row_group_size=1000)
    return path


class Clock(Progress):
    """Records when the first and the last row came out of the converter (no output)."""

    def __init__(self) -> None:
        super().__init__("log", every=float("inf"), stream=io.StringIO())
        self.first = self.last = 0.0
        self.rows = 0

    def update(self, done: int, written: int, rejected: int) -> None:
        now = time.perf_counter()
        if done == 1:
            self.first = now
        self.last, self.rows = now, done


def cpu() -> tuple[float, float]:
    """(this process, its reaped children) CPU seconds."""
    me, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return me.ru_utime + me.ru_stime, kids.ru_utime + kids.ru_stime


def run(parquet: Path, root: Path, out: Path, workers: int) -> dict:
    shutil.rmtree(out, ignore_errors=True)
    clock = Clock()
    (me0, kids0), t0 = cpu(), time.perf_counter()
    s = convert_parquet(parquet, root, str(out / "m3t-%06d.tar"), workers=workers, progress=clock,
                        max_samples_per_shard=1000)
    wall = time.perf_counter() - t0
    me1, kids1 = cpu()
    assert s.rejected == 0, s
    total_cpu = (me1 - me0) + (kids1 - kids0)
    return {"workers": workers, "rows": clock.rows, "wall": wall, "rate": clock.rows / wall,
            "steady": (steady := (clock.rows - 1) / max(clock.last - clock.first, 1e-9)),
            "per_core": steady / max(1, workers),
            "cpu_ms": 1000 * total_cpu / clock.rows, "writer_ms": 1000 * (me1 - me0) / clock.rows,
            "mb": sum(x["bytes"] for x in s.shards) / 2**20}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rows", type=int, default=2000)
    p.add_argument("--workers", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--size", default="500x400", help="image width x height")
    p.add_argument("--repeats", type=int, default=1, help="runs per worker count; the best counts")
    args = p.parse_args()
    size = tuple(int(x) for x in args.size.lower().split("x"))
    with tempfile.TemporaryDirectory(prefix="bench_convert_") as tmp:
        d = Path(tmp)
        t0 = time.perf_counter()
        parquet = build(d, args.rows, size)  # type: ignore[arg-type]
        jpeg_kb = sum(f.stat().st_size for f in (d / "images").rglob("*.jpg")) / args.rows / 1024
        print(f"built {args.rows} rows, {size[0]}x{size[1]} JPEGs of {jpeg_kb:.0f} KB on average, "
              f"in {time.perf_counter() - t0:.1f} s")
        results = []
        for w in args.workers:
            best = max((run(parquet, d / "images", d / f"out{w}", w) for _ in range(args.repeats)),
                       key=lambda r: r["steady"])
            results.append(best)
        print(f"{'workers':>7} {'rows/s':>8} {'steady':>8} {'per core':>8} {'cpu ms/row':>10} {'writer ms/row':>13} "
              f"{'wall s':>7} {'shards MB':>9}")
        for r in results:
            print(f"{r['workers']:>7} {r['rate']:>8.1f} {r['steady']:>8.1f} {r['per_core']:>8.1f} "
                  f"{r['cpu_ms']:>10.2f} {r['writer_ms']:>13.2f} {r['wall']:>7.2f} {r['mb']:>9.1f}")
    best = max(results, key=lambda r: r["per_core"])
    per_core, node = best["per_core"], NODE_CORES * best["per_core"]
    print(f"best: {per_core:.1f} rows/s per core (workers={best['workers']})")
    print(f"M3T ({M3T_ROWS:,} rows): one core {timedelta(seconds=round(M3T_ROWS / per_core))}; "
          f"a {NODE_CORES}-core node {timedelta(seconds=round(M3T_ROWS / node))} ({node:,.0f} rows/s)")
    writer = [r["writer_ms"] for r in results if r["workers"] > 0]
    if writer:  # the main process reads the parquet and writes the shards for all of its workers
        ceiling = 1000 / min(writer)
        print(f"one converter's writer keeps up with ~{ceiling:,.0f} rows/s: {node:,.0f} rows/s on a node takes "
              f">= {-(-node // ceiling):.0f} converter process(es) there (e.g. that many --part tasks per node)")

if __name__ == "__main__":
    main()
