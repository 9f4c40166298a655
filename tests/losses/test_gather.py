"""Gathers: identity in a single process; exact gradient-carrying gather and size checks on 2 gloo ranks."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist

from muco.losses import (
    all_gather_no_grad,
    all_gather_with_grad,
    dist_world_size,
    gather_row_counts,
    rank_offset,
)


def test_single_process_identity():
    assert not (dist.is_available() and dist.is_initialized())  # never initialise inside pytest
    x = torch.randn(4, 3, requires_grad=True)
    y = all_gather_with_grad(x)
    assert y is x  # no copy, gradient flows unchanged
    ids = torch.tensor([3, 3, 5])
    assert torch.equal(all_gather_no_grad(ids), ids)
    assert not all_gather_no_grad(x).requires_grad
    assert dist_world_size() == 1
    assert rank_offset(4) == 0
    assert gather_row_counts(7) == [7]


def test_scalar_rejected():
    with pytest.raises(ValueError):
        all_gather_with_grad(torch.tensor(1.0))


@pytest.mark.slow
def test_two_rank_gather(dist_report):
    ranks = dist_report["gather"]
    for r, res in enumerate(ranks):
        assert res["values_ok"]
        assert res["grad_err"] == 0.0  # backward sums every rank's upstream gradient for the owned rows
        assert res["ints"] == [0, 0, 1, 7]
        assert res["bools"] == [True, True, False, True]
        assert res["offset"] == 5 * r
        # Unequal row counts: a clear error on every rank instead of an aborted collective.
        assert "same number of rows" in res["mismatch"] and "[3, 4]" in res["mismatch"]
