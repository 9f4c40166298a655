"""Mining's search at growing corpus sizes, with the corpus in one process or sharded over W processes (issue 14):
per-rank corpus memory, peak memory and search time, and the extrapolation to M3T on 32 GPUs.

Each rank is a real process (W > 1: gloo on the CPU, the ring of :mod:`muco.mine.ring`); it holds a contiguous
share of N random unit vectors (generated per 65,536-row chunk from its own seed, so any share is the same rows
for any W) and its share of the queries, and runs ``ring_search`` exactly as ``muco mine`` does. Measured per rank:
the shard's bytes, the process's resident memory before the search and its peak during it (``VmHWM`` reset via
``/proc/self/clear_refs``), the search time, and the exact re-scoring (candidates re-scored per query per shard,
seconds). The merged W-process result is checked against the 1-process one (``identical``).

``GF/s`` is the nominal matmul work ``2 x queries x N/W x d`` per rank over the search time; ``gemm GF/s`` is a
plain fp32 ``[1024 x d] @ [d x 16384]`` on this machine (the ceiling). The extrapolation takes M3T's 5.1 M records
x 7 turns = 35.7 M query turns and 35.7 M target texts (an upper bound on the unique ones) at d = 1,536 over 32
GPUs, and states its GPU assumptions.

    python benchmarks/bench_mining.py                                   # 10 k, 100 k, 1 M; W = 1, 2; ~6 min
    python benchmarks/bench_mining.py --sizes 10000 100000 --queries 2000
    python benchmarks/bench_mining.py --sizes 100000 --dtype bfloat16   # re-scoring work under the bf16 bound
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import muco.mine.search as search  # noqa: E402
from muco.mine.ring import ring_search  # noqa: E402
from muco.mine.search import Shard  # noqa: E402

CHUNK = 1 << 16
M3T_QUERIES = M3T_TARGETS = 5_100_000 * 7
GPUS = 32
H200_BF16_DENSE = 989e12  # FLOP/s, dense (no sparsity), the H100/H200 SXM datasheet figure
H200_HBM = 4.8e12  # B/s


def rows(lo: int, hi: int, dim: int, seed: int) -> torch.Tensor:
    """Rows [lo, hi) of the benchmark corpus (unit vectors; chunk c drawn from seed + c)."""
    out = torch.empty(hi - lo, dim)
    for c in range(lo // CHUNK, -(-hi // CHUNK)):
        a, b = max(lo, c * CHUNK), min(hi, (c + 1) * CHUNK)
        g = torch.Generator().manual_seed(seed + c)
        block = torch.randn(CHUNK, dim, generator=g)[a - c * CHUNK : b - c * CHUNK]
        out[a - lo : b - lo] = F.normalize(block, dim=1)
    return out


def memory() -> dict[str, int]:
    out = {}
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(("VmRSS", "VmHWM")):
            out[line.split(":")[0]] = int(line.split()[1]) * 1024
    return out


def _rank(rank: int, world: int, init: str | None, args: argparse.Namespace, n: int, out: str) -> None:
    torch.set_num_threads(args.threads)
    if world > 1:
        dist.init_process_group("gloo", init_method=f"file://{init}", rank=rank, world_size=world)
    lo, hi = n * rank // world, n * (rank + 1) // world
    emb = rows(lo, hi, args.dim, seed=1000)
    queries = rows(0, args.queries, args.dim, seed=7)[args.queries * rank // world : args.queries * (rank + 1) // world]
    pos = torch.randint(0, n, (len(queries),), generator=torch.Generator().manual_seed(rank))
    shard = Shard(emb, start=lo)
    dtype = getattr(torch, args.dtype)
    shard.rounding_error(dtype)  # measured once per shard, before the clock (muco mine does it in the first block)
    stats = {"pairs": 0, "rescore_s": 0.0}
    exact = search.pair_scores

    def counted(q: torch.Tensor, r: torch.Tensor) -> torch.Tensor:
        t = time.perf_counter()
        s = exact(q, r)
        stats["rescore_s"] += time.perf_counter() - t
        stats["pairs"] += r.shape[0] * r.shape[1]
        return s

    search.pair_scores = counted
    before = memory()["VmRSS"]
    Path("/proc/self/clear_refs").write_text("5")  # peak resident memory from here
    if world > 1:
        dist.barrier()
    t = time.perf_counter()
    parts = list(ring_search(queries, pos, shard, args.k, args.query_chunk, args.corpus_chunk, dtype=dtype))
    elapsed = time.perf_counter() - t
    peak = memory()["VmHWM"]
    result = [torch.cat([p.scores for p in parts]), torch.cat([p.indices for p in parts])]
    torch.save({"shard_bytes": emb.numel() * 4, "before": before, "peak": peak, "seconds": elapsed,
                "pairs": stats["pairs"] - args.queries * (rank + 1) // world + args.queries * rank // world,
                "rescore_s": stats["rescore_s"], "result": result}, Path(out) / f"r{rank}.pt")
    if world > 1:
        dist.destroy_process_group()


def run(world: int, n: int, args: argparse.Namespace) -> list[dict]:
    with tempfile.TemporaryDirectory() as out:
        init = os.path.join(out, "init")
        # forked after import, before any torch work: every rank starts with torch loaded
        mp.start_processes(_rank, args=(world, init, args, n, out), nprocs=world, join=True, start_method="fork")
        return [torch.load(Path(out) / f"r{r}.pt") for r in range(world)]


def gemm_rate(dim: int, threads: int) -> float:
    torch.set_num_threads(threads)
    a, b = torch.randn(1024, dim), torch.randn(16384, dim)
    a @ b.T
    t = time.perf_counter()
    for _ in range(3):
        a @ b.T
    return 3 * 2 * 1024 * 16384 * dim / (time.perf_counter() - t)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sizes", type=int, nargs="+", default=[10_000, 100_000, 1_000_000])
    ap.add_argument("--worlds", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--dim", type=int, default=1536)
    ap.add_argument("--queries", type=int, default=1000, help="query turns over all ranks")
    ap.add_argument("--k", type=int, default=307, help="search depth: top_k 100 + 7 turns + extra 200")
    ap.add_argument("--query-chunk", type=int, default=1024)
    ap.add_argument("--corpus-chunk", type=int, default=16384)
    ap.add_argument("--threads", type=int, default=1, help="intra-op threads per rank")
    ap.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32",
                    help="candidate matmul inputs (bfloat16 on the CPU: bf16-rounded inputs, fp32 products; the "
                         "bound and so the re-scoring work of the GPU path, not its speed)")
    args = ap.parse_args()
    mb = 2**20
    print(f"queries {args.queries}, d {args.dim}, k {args.k}, query block {args.query_chunk}, corpus chunk "
          f"{args.corpus_chunk}, {args.threads} thread(s) per rank, candidate matmuls {args.dtype}")
    gemm = gemm_rate(args.dim, args.threads)
    print(f"gemm GF/s (fp32, {args.threads} thread(s)): {gemm / 1e9:.1f}")
    head = (f"{'N':>9} {'W':>2} {'shard MB':>9} {'RSS MB':>8} {'peak MB':>8} {'search s':>9} {'GF/s':>6} "
            f"{'rescored/q/shard':>16} {'rescore s':>9} {'identical':>9}")
    print(head)
    rates = []
    for n in args.sizes:
        ref = None
        for world in args.worlds:
            ranks = run(world, n, args)
            res = [torch.cat([r["result"][j] for r in ranks]) for j in (0, 1)]
            same = "-" if ref is None else ("yes" if all(torch.equal(a, b) for a, b in zip(res, ref)) else "NO")
            ref = ref if ref is not None else res
            secs = max(r["seconds"] for r in ranks)
            flops = 2 * args.queries * (n / world) * args.dim
            rates.append(flops / secs)
            pairs = sum(r["pairs"] for r in ranks) / (args.queries * world)
            for r, x in enumerate(ranks):
                print(f"{n:>9} {world:>2} {x['shard_bytes'] / mb:>9.1f} {x['before'] / mb:>8.0f} "
                      f"{x['peak'] / mb:>8.0f} {x['seconds']:>9.2f} {flops / x['seconds'] / 1e9:>6.1f} "
                      f"{pairs:>16.1f} {x['rescore_s']:>9.2f} {same if r == 0 else '':>9}")

    # M3T on 32 GPUs
    n_r, d, k, b = M3T_TARGETS / GPUS, args.dim, args.k, args.query_chunk
    flops = 2 * M3T_QUERIES * n_r * d
    print(f"\nM3T extrapolation: {M3T_QUERIES / 1e6:.1f} M query turns x {M3T_TARGETS / 1e6:.1f} M targets x {d} "
          f"dims, {GPUS} GPUs")
    print(f"  corpus per rank: {n_r / 1e6:.2f} M rows = {n_r * d * 4 / 1e9:.2f} GB fp32 + {n_r * d * 2 / 1e9:.2f} GB "
          f"bf16 copy (replicated, as before: {M3T_TARGETS * d * 4 / 1e9:.0f} GB fp32 per rank)")
    print(f"  query block in flight per rank: {2 * b * (d * 4 + k * 12 + 16) / 1e6:.1f} MB (sent + received), "
          f"own query turns {M3T_QUERIES / GPUS * d * 4 / 1e9:.2f} GB fp32 (CPU)")
    print(f"  matmul work per GPU: {flops:.3g} FLOP; measured here {max(rates) / 1e9:.1f} GF/s per rank -> "
          f"{flops / max(rates) / 3600:.0f} h per rank on this CPU")
    for mfu in (1.0, 0.6):
        print(f"  H200 bf16 dense {H200_BF16_DENSE / 1e12:.0f} TFLOP/s at {mfu:.0%} of peak: "
              f"{flops / (H200_BF16_DENSE * mfu):.0f} s")
    scores = M3T_QUERIES * n_r
    print(f"  fp32 scores written and read by top-k ({scores:.3g} per GPU, 8 B each at {H200_HBM / 1e12:.1f} TB/s): "
          f">= {scores * 8 / H200_HBM:.0f} s")
    ring = M3T_QUERIES * (d * 4 + k * 12 + 16)
    print(f"  ring traffic per rank: {ring / 1e9:.0f} GB over the run ({ring / 25e9:.0f} s at 25 GB/s)")


if __name__ == "__main__":
    main()
