"""Pretraining loss (docs/method.md §7) against a naive loop reference with explicit column sets A(i)."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from muco.losses import group_mask, pretrain_loss

D = 12


def _emb(n: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return F.normalize(torch.randn(n, D, generator=g), dim=-1)


def reference_pretrain(
    q, t, gid, tau, negs=None, neg_valid=None, pos_text=None, neg_text=None, same_text=False
) -> torch.Tensor:
    """l_i = -s_{i,i}/τ + log Σ_{j∈A(i)} exp(s_ij/τ), with A(i) spelled out column by column (float64)."""
    q, t = q.double(), t.double()
    n = len(gid)
    losses = []
    for i in range(n):
        cols = [i]  # the positive c(i) = i in a single process
        for j in range(n):
            if j == i or gid[j] == gid[i]:
                continue  # other targets of the same image are not in A(i)
            if same_text and pos_text[j] == pos_text[i]:
                continue
            cols.append(j)
        logits = [torch.dot(q[i], t[j]) / tau for j in cols]
        if negs is not None:
            for k in range(len(negs)):
                if neg_valid is not None and not neg_valid[k]:
                    continue
                if neg_text is not None and neg_text[k] == pos_text[i]:
                    continue
                logits.append(torch.dot(q[i], negs[k].double()) / tau)
        losses.append(-torch.dot(q[i], t[i]) / tau + torch.logsumexp(torch.stack(logits), 0))
    return torch.stack(losses).mean()


def _leaves(*xs):
    return [x.clone().requires_grad_() for x in xs]


def _check(kwargs_loss, kwargs_ref, q, t, negs=None, tau=0.05, atol=2e-5):
    """Loss value and gradients w.r.t. q, t (and negatives) of the package vs the reference."""
    ins = _leaves(q, t) + (_leaves(negs) if negs is not None else [])
    out = pretrain_loss(
        ins[0], ins[1], tau=tau, negatives=ins[2] if negs is not None else None, **kwargs_loss
    )
    out.loss.backward()
    refs = _leaves(q.double(), t.double()) + (_leaves(negs.double()) if negs is not None else [])
    ref = reference_pretrain(
        refs[0], refs[1], tau=tau, negs=refs[2] if negs is not None else None, **kwargs_ref
    )
    ref.backward()
    assert out.loss.dtype == torch.float32
    assert out.loss.item() == pytest.approx(ref.item(), rel=1e-5, abs=atol)
    for a, b in zip(ins, refs):
        torch.testing.assert_close(a.grad.double(), b.grad, atol=atol, rtol=1e-4)
    return out, ref


GROUPS = [0, 0, 0, 1, 2, 2]


@pytest.mark.parametrize("tau", [0.02, 0.05, 1.0])
def test_uneven_turns_match_reference(tau):
    gid = torch.tensor(GROUPS)
    _check(dict(group_id=gid), dict(gid=GROUPS), _emb(6, 0), _emb(6, 1), tau=tau, atol=1e-4)


def test_non_consecutive_group_ids_match_reference():
    groups = [7, 3, 7, 3, 9, 7, 11]  # turns of one image need not be adjacent, ids need not be dense
    _check(dict(group_id=torch.tensor(groups)), dict(gid=groups), _emb(7, 2), _emb(7, 3))


def test_hard_negatives_with_invalid_and_text_masks_match_reference():
    negs = _emb(5, 4)
    valid = [True, False, True, True, True]
    pos_text = [100, 101, 102, 103, 104, 105]
    neg_text = [102, 200, 201, 105, 202]  # negative 0 equals row 2's positive, negative 3 row 5's
    out, _ = _check(
        dict(
            group_id=torch.tensor(GROUPS),
            negative_valid=torch.tensor(valid),
            positive_text_id=torch.tensor(pos_text),
            negative_text_id=torch.tensor(neg_text),
        ),
        dict(gid=GROUPS, neg_valid=valid, pos_text=pos_text, neg_text=neg_text),
        _emb(6, 5),
        _emb(6, 6),
        negs=negs,
    )
    assert out.num_columns == 6 + 5


def test_same_text_mask_matches_reference():
    pos_text = [1, 2, 3, 1, 4, 2]  # row 3 (group 1) shares text with row 0 (group 0), row 5 with row 1
    _check(
        dict(group_id=torch.tensor(GROUPS), positive_text_id=torch.tensor(pos_text), mask_same_text=True),
        dict(gid=GROUPS, pos_text=pos_text, same_text=True),
        _emb(6, 7),
        _emb(6, 8),
    )


def test_one_turn_is_plain_infonce():
    q, t = _emb(5, 9), _emb(5, 10)
    out = pretrain_loss(q, t, torch.arange(5), tau=0.02)
    plain = F.cross_entropy(q @ t.T / 0.02, torch.arange(5))
    torch.testing.assert_close(out.loss, plain)
    assert out.masked_frac.item() == 0.0


def test_symmetric_adds_reverse_direction():
    q, t, gid = _emb(6, 11), _emb(6, 12), torch.tensor(GROUPS)
    out = pretrain_loss(q, t, gid, tau=0.05, symmetric=True)
    ref = 0.5 * (reference_pretrain(q, t, GROUPS, 0.05) + reference_pretrain(t, q, GROUPS, 0.05))
    assert out.loss.item() == pytest.approx(ref.item(), rel=1e-5)
    assert set(out.terms) == {"q2t", "t2q"}


def test_masked_targets_never_influence_their_rows():
    """Perturbing target j (same image as row i, j != i) leaves row i's loss and dL/dq_i unchanged."""
    gid = torch.tensor(GROUPS)
    q, t = _emb(6, 13), _emb(6, 14)

    def run(t_):
        q_ = q.clone().requires_grad_()
        out = pretrain_loss(q_, t_, gid, tau=0.02)
        out.loss.backward()
        return out.row_loss, q_.grad

    base_rows, base_grad = run(t)
    t2 = t.clone()
    # Row 1 is masked for rows 0 and 2 (same image); aim it at q0, q2 and q3 so it would matter if it leaked.
    t2[1] = q[0] + q[2] + q[3]
    rows, grad = run(t2)
    for i in (0, 2):
        assert rows[i] == base_rows[i]
        assert torch.equal(grad[i], base_grad[i])
    assert not torch.equal(rows[3], base_rows[3])  # ...but it is a negative for the other images' rows


def test_invalid_negatives_never_influence_loss_or_gradients():
    gid = torch.tensor(GROUPS)
    q, t, negs = _emb(6, 15), _emb(6, 16), _emb(4, 17)
    valid = torch.tensor([True, False, True, False])

    def run(n_):
        q_, t_, n_ = _leaves(q, t, n_)
        out = pretrain_loss(q_, t_, gid, tau=0.02, negatives=n_, negative_valid=valid)
        out.loss.backward()
        return out.loss, q_.grad, t_.grad, n_.grad

    base = run(negs)
    negs2 = negs.clone()
    negs2[[1, 3]] = torch.randn(2, D) * 5
    pert = run(negs2)
    for a, b in zip(base, pert):
        assert torch.equal(a, b)
    assert torch.all(pert[3][[1, 3]] == 0)  # masked negatives get exactly zero gradient


def test_learnable_tau_gradient_matches_reference():
    gid = torch.tensor(GROUPS)
    q, t = _emb(6, 18), _emb(6, 19)
    log_tau = torch.tensor(math.log(0.05), requires_grad=True)
    pretrain_loss(q, t, gid, tau=log_tau.exp()).loss.backward()
    log_tau_ref = torch.tensor(math.log(0.05), dtype=torch.float64, requires_grad=True)
    reference_pretrain(q, t, GROUPS, log_tau_ref.exp()).backward()
    assert log_tau.grad.item() == pytest.approx(log_tau_ref.grad.item(), rel=1e-4)


def test_stats():
    gid = torch.tensor([0, 0, 1])
    q = torch.eye(3)
    t = F.normalize(torch.tensor([[1.0, 0, 0], [0.6, 0.8, 0], [0.0, 0.0, 1.0]]), dim=-1)
    negs = torch.tensor([[0.9, 0.1, 0.0], [0.0, 0.0, -1.0]])
    out = pretrain_loss(
        q, t, gid, tau=0.1, negatives=F.normalize(negs, dim=-1), negative_valid=torch.tensor([1, 0])
    )
    assert out.num_columns == 5
    assert out.pos_sim.item() == pytest.approx((1.0 + 0.8 + 1.0) / 3)
    # Masked: (0,1), (1,0) same image, and the invalid negative for all 3 rows = 5 of 15 logits.
    assert out.masked_frac.item() == pytest.approx(5 / 15)
    n0 = F.normalize(negs, dim=-1)[0]
    # Row 0 sees t2 (0) and n0; row 1 sees t2 (0) and n0; row 2 sees t0, t1 (both 0) and n0.
    hardest = [max(0.0, n0[0].item()), max(0.0, n0[1].item()), max(0.0, n0[2].item())]
    assert out.hardest_neg_sim.item() == pytest.approx(sum(hardest) / 3, abs=1e-6)
    assert not out.loss.detach().isnan()
    logged = out.log_dict("train/")
    assert set(logged) >= {"train/loss", "train/pos_sim", "train/hardest_neg_sim", "train/masked_frac"}


def test_group_mask():
    m = group_mask(torch.tensor([5, 5, 6]), torch.tensor([5, 5, 6, 5]), torch.tensor([0, 1, 2]))
    expected = torch.tensor([[0, 1, 0, 1], [1, 0, 0, 1], [0, 0, 0, 0]], dtype=torch.bool)
    assert torch.equal(m, expected)


def test_input_validation():
    q, t = _emb(4, 20), _emb(4, 21)
    with pytest.raises(ValueError):
        pretrain_loss(q, t[:3], torch.arange(4))
    with pytest.raises(ValueError):
        pretrain_loss(q, t, torch.arange(3))
    with pytest.raises(ValueError):
        pretrain_loss(q, t, torch.arange(4), negative_valid=torch.ones(2, dtype=torch.bool))
    with pytest.raises(ValueError):
        pretrain_loss(q, t, torch.arange(4), mask_same_text=True)


def test_bf16_inputs_use_fp32_logits():
    q, t = _emb(6, 22), _emb(6, 23)
    out = pretrain_loss(q.bfloat16(), t.bfloat16(), torch.tensor(GROUPS), tau=0.02)
    ref = reference_pretrain(q.bfloat16().float(), t.bfloat16().float(), GROUPS, 0.02)
    assert out.loss.dtype == torch.float32
    assert out.loss.item() == pytest.approx(ref.item(), rel=1e-5)


@pytest.mark.slow
def test_distributed_gradients_equal_single_process(dist_report):
    for name in ("pretrain", "pretrain_neg_sym"):
        errs = dist_report["cases"][name]
        for key, err in errs.items():
            if not key.endswith("_ref_norm"):
                assert err < 1e-5, (name, key, err)
        assert errs["q_ref_norm"] > 0.1 and errs["t_ref_norm"] > 0.1  # non-trivial gradients were compared


@pytest.mark.slow
def test_distributed_check_catches_a_nograd_gather(dist_report):
    assert dist_report["cases"]["control_nograd_gather"]["t"] > 1e-2
