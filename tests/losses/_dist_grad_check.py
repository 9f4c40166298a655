"""2-process (gloo, CPU) check that the gathered losses give the single-process full-batch gradients.

Run as ``python tests/losses/_dist_grad_check.py``; prints one JSON line (the last line of stdout) that
``tests/losses/conftest.py`` parses. The parent computes the single-process reference (torch.distributed
not initialised, so every gather is the identity) on the union batch, then spawns 2 ranks that each compute
the loss on their slice and backpropagate. With DDP-style averaging (each rank's loss is a mean over its local
rows, the total is the mean over ranks), the gradient w.r.t. rank r's inputs is ``x_r.grad / W``; that, and
the rank-averaged gradient of a shared learnable τ, must equal the reference. The case
``control_nograd_gather`` swaps in the classic wrong gather and must *fail* (shows the check has teeth).
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import sys
import tempfile

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

import muco.losses.pretrain as pretrain_module
from muco.losses import (
    all_gather_no_grad,
    all_gather_with_grad,
    blockwise_loss,
    joint_masked_loss,
    pretrain_loss,
    rank_offset,
)

W = 2
D = 16
ROWS = 6  # pretraining rows per rank
B = 4  # fine-tuning samples per rank
GROUPS = [[0, 0, 0, 1, 2, 2], [3, 3, 4, 5, 5, 5]]  # uneven turns per image, equal rows per rank
NEG_VALID = [[True, False, True, True], [True, True, False, True]]


def _data(seed: int = 0) -> dict[str, torch.Tensor]:
    """Full (union) batch; every rank regenerates it identically and takes its slice."""
    g = torch.Generator().manual_seed(seed)

    def r(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=g)

    return {
        "q": r(W * ROWS, D),
        "t": r(W * ROWS, D),
        "neg": r(W * 4, D),
        "fq": r(W * B, D),
        "fq2": r(W * B, D),
        "fp": r(W * B, D),
        "fp2": r(W * B, D),
        "fneg": r(W * B, D),
    }


def _extras() -> dict[str, torch.Tensor]:
    gid = torch.tensor(sum(GROUPS, []))
    # Text ids: some in-batch targets share a text across images; some negatives equal a row's positive.
    pos_text = torch.tensor([10, 11, 12, 13, 14, 15, 16, 10, 17, 18, 19, 11])
    neg_text = torch.tensor([12, 90, 91, 92, 93, 94, 16, 95])
    neg_valid = torch.tensor(sum(NEG_VALID, []))
    f_text = torch.tensor([1, 2, 3, 1, 4, 5, 2, 6])
    f_neg_text = torch.tensor([3, 7, 8, 9, 9, 5, 10, 11])
    return dict(
        gid=gid, pos_text=pos_text, neg_text=neg_text, neg_valid=neg_valid, f_text=f_text, f_neg=f_neg_text
    )


@contextlib.contextmanager
def _nograd_gather():
    """Negative control: the classic wrong gather (no-grad, local slice put back with its gradient)."""

    def wrong(x: torch.Tensor, group=None) -> torch.Tensor:
        full = all_gather_no_grad(x, group)
        off = rank_offset(x.shape[0], group)
        return torch.cat([full[:off], x, full[off + x.shape[0] :]])

    real = pretrain_module.all_gather_with_grad
    pretrain_module.all_gather_with_grad = wrong
    try:
        yield
    finally:
        pretrain_module.all_gather_with_grad = real


def _cases(x: dict[str, torch.Tensor], e: dict[str, torch.Tensor], sl, fsl, nsl, tau):
    """name -> loss closure over the raw leaves in ``x``; the slices pick this rank's rows."""
    n = F.normalize

    def pre_plain():
        return pretrain_loss(n(x["q"][sl], dim=-1), n(x["t"][sl], dim=-1), e["gid"][sl], tau).loss

    def pre_full():
        return pretrain_loss(
            n(x["q"][sl], dim=-1),
            n(x["t"][sl], dim=-1),
            e["gid"][sl],
            tau,
            negatives=n(x["neg"][nsl], dim=-1),
            negative_valid=e["neg_valid"][nsl],
            positive_text_id=e["pos_text"][sl],
            negative_text_id=e["neg_text"][nsl],
            symmetric=True,
            mask_same_text=True,
        ).loss

    def control():
        with _nograd_gather():
            return pre_plain()

    def fine(fn):
        def run():
            return fn(
                n(x["fq"][fsl], dim=-1),
                n(x["fq2"][fsl], dim=-1),
                n(x["fp"][fsl], dim=-1),
                n(x["fp2"][fsl], dim=-1),
                tau,
                negatives=n(x["fneg"][fsl], dim=-1),
                negative_valid=e["neg_valid"][fsl],
                positive_text_id=e["f_text"][fsl],
                negative_text_id=e["f_neg"][fsl],
                mask_same_text=True,
            ).loss

        return run

    return {
        "pretrain": pre_plain,
        "pretrain_neg_sym": pre_full,
        "blockwise_neg": fine(blockwise_loss),
        "joint_neg": fine(joint_masked_loss),
        "control_nograd_gather": control,
    }


def _grads(rank: int | None) -> dict[str, dict[str, torch.Tensor]]:
    x = {k: v.requires_grad_() for k, v in _data().items()}
    e = _extras()
    all_rows = slice(None)
    sl = all_rows if rank is None else slice(rank * ROWS, (rank + 1) * ROWS)
    fsl = all_rows if rank is None else slice(rank * B, (rank + 1) * B)
    nsl = all_rows if rank is None else slice(rank * 4, (rank + 1) * 4)
    out = {}
    for name in _cases(x, e, sl, fsl, nsl, 0.0).keys():
        for v in x.values():
            v.grad = None
        log_tau = torch.tensor(0.05).log().requires_grad_()
        loss = _cases(x, e, sl, fsl, nsl, log_tau.exp())[name]()
        loss.backward()
        grads = {k: v.grad.clone() for k, v in x.items() if v.grad is not None}
        grads["tau"] = log_tau.grad.clone()
        out[name] = {"loss": loss.detach(), **grads}
    return out


def _gather_checks(rank: int) -> dict:
    x = (torch.arange(6.0).reshape(3, 2) + 100 * rank).requires_grad_()
    y = all_gather_with_grad(x)
    w = torch.arange(12.0).reshape(6, 2) * (rank + 1)  # rank-dependent upstream gradient
    (y * w).sum().backward()
    # Backward must sum the upstream gradients of all ranks for this rank's rows: Σ_r (r+1) = 3.
    expected = 3 * torch.arange(12.0).reshape(6, 2)[rank * 3 : rank * 3 + 3]
    ints = all_gather_no_grad(torch.tensor([rank, 7 * rank]))
    bools = all_gather_no_grad(torch.tensor([rank == 0, True]))
    try:
        rank_offset(3 + rank)
        mismatch = "no error"
    except ValueError as err:
        mismatch = str(err)
    return {
        "values_ok": bool(torch.equal(y.detach()[:3], torch.arange(6.0).reshape(3, 2))),
        "grad_err": float((x.grad - expected).abs().max()),
        "ints": ints.tolist(),
        "bools": bools.tolist(),
        "offset": rank_offset(5),
        "mismatch": mismatch,
    }


def _worker(rank: int, port: int, outdir: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=W)
    try:
        result = {"grads": _grads(rank), "gather": _gather_checks(rank)}
        torch.save(result, os.path.join(outdir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main() -> dict:
    torch.set_num_threads(1)
    ref = _grads(None)
    with tempfile.TemporaryDirectory() as outdir:
        mp.spawn(_worker, args=(_free_port(), outdir), nprocs=W, join=True)
        ranks = [torch.load(os.path.join(outdir, f"rank{r}.pt")) for r in range(W)]
    report: dict = {"cases": {}, "gather": [r["gather"] for r in ranks]}
    slices = {"q": ROWS, "t": ROWS, "neg": 4, "fq": B, "fq2": B, "fp": B, "fp2": B, "fneg": B}
    for name, want in ref.items():
        errs = {}
        # Total loss = mean over ranks of the local losses.
        got_loss = sum(r["grads"][name]["loss"] for r in ranks) / W
        errs["loss"] = float((got_loss - want["loss"]).abs())
        got_tau = sum(r["grads"][name]["tau"] for r in ranks) / W  # DDP averages a replicated parameter
        errs["tau"] = float((got_tau - want["tau"]).abs())
        for key in want:
            if key in ("loss", "tau"):
                continue
            k = slices[key]
            got = torch.cat([r["grads"][name][key][i * k : (i + 1) * k] for i, r in enumerate(ranks)]) / W
            errs[key] = float((got - want[key]).abs().max())
            errs[key + "_ref_norm"] = float(want[key].norm())
        report["cases"][name] = errs
    return report


if __name__ == "__main__":
    print(json.dumps(main()))
    sys.stdout.flush()
