"""Trainable ``<|emb|>``/``<|mask|>`` rows: PEFT's ``trainable_token_indices`` layer against ``TokenRows``, per
embedding forward (and forward + backward) at Qwen2-VL-2B's table shape (151,657 x 1,536), on CPU.

PEFT's layer builds a copy of the whole table on every forward (``index_copy``) and, in backward, a dense
table-sized gradient of that copy; ``TokenRows`` looks up the frozen table and puts the two rows in at their
positions. Each path runs in its own process, so its peak memory is its own: the peak resident memory above
what the process held after building the table and the inputs (large tensors are mmapped by glibc and go back
to the system when freed, so the peak is the largest set of live tensors). Times are medians.

    python benchmarks/bench_token_rows.py [--vocab 151657] [--dim 1536] [--batch 8] [--seq 1024]
                                          [--dtype float32] [--reps 5]
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import statistics
import time
from typing import Any


def _status_kb(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"no {field} in /proc/self/status")


def _reset_peak() -> bool:
    # "5" resets VmHWM (the peak resident size) to the current size; not allowed everywhere
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def run_path(path: str, args: dict[str, Any]) -> dict[str, float]:
    """Time and peak memory of one path ("peft" or "token_rows"), in this (child) process."""
    import torch
    from torch import nn

    from muco.model.token_rows import TokenRows

    torch.manual_seed(0)
    dtype = getattr(torch, args["dtype"])
    table = nn.Embedding(args["vocab"], args["dim"], padding_idx=0, dtype=dtype).requires_grad_(False)
    ids = [args["vocab"] - 2, args["vocab"] - 1]  # where Qwen2's added tokens are
    if path == "peft":
        from peft.utils.other import TrainableTokensWrapper

        layer: nn.Module = TrainableTokensWrapper(table, "default", token_indices=ids)
    else:
        layer = TokenRows(table, ids)
    tokens = torch.randint(0, args["vocab"] - 2, (args["batch"], args["seq"]))
    tokens[:, -1] = ids[0]  # one <|emb|> per sequence, a few <|mask|>
    tokens[:, 5:8] = ids[1]
    ramp = torch.linspace(-1, 1, args["dim"], dtype=dtype)

    def forward() -> torch.Tensor:
        return layer(tokens)

    def forward_backward() -> None:
        (forward() * ramp).sum().backward()
        for p in layer.parameters():
            p.grad = None

    out: dict[str, float] = {}
    for name, fn in (("forward", forward), ("forward_backward", forward_backward)):
        fn()  # warm-up
        base = _status_kb("VmRSS")
        exact = _reset_peak()
        times = []
        for _ in range(args["reps"]):
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
        out[f"{name}_ms"] = 1e3 * statistics.median(times)
        out[f"{name}_peak_mb"] = (_status_kb("VmHWM") - base) / 1024 if exact else float("nan")
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--vocab", type=int, default=151_657)
    ap.add_argument("--dim", type=int, default=1536)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq", type=int, default=1024)
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    ap.add_argument("--reps", type=int, default=5)
    args = vars(ap.parse_args())
    ctx = mp.get_context("spawn")  # a fresh process per path: no allocator state or peak carried over
    results = {}
    for path in ("peft", "token_rows"):
        with ctx.Pool(1) as pool:
            results[path] = pool.apply(run_path, (path, args))
    mib = args["vocab"] * args["dim"] * (4 if args["dtype"] == "float32" else 2) / 2**20
    print(f"table {args['vocab']:,} x {args['dim']:,} {args['dtype']} ({mib:,.0f} MiB), "
          f"tokens {args['batch']} x {args['seq']}, median of {args['reps']}")
    print(f"{'':28s}{'PEFT trainable tokens':>24s}{'TokenRows':>12s}{'PEFT / TokenRows':>19s}")
    rows = [("forward ms", "forward_ms"), ("forward peak MiB", "forward_peak_mb"),
            ("forward+backward ms", "forward_backward_ms"), ("forward+backward peak MiB", "forward_backward_peak_mb")]
    for label, key in rows:
        old, new = results["peft"][key], results["token_rows"][key]
        ratio = old / new if new > 0 else float("inf")
        print(f"{label:28s}{old:24.1f}{new:12.1f}{ratio:18.1f}x")


if __name__ == "__main__":
    main()
