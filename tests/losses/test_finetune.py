"""Fine-tuning losses (docs/method.md §8.3) against naive loop references."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from muco.losses import TERM_NAMES, blockwise_loss, joint_masked_loss

D = 10
B = 5


def _emb(n: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return F.normalize(torch.randn(n, D, generator=g), dim=-1)


def _batch(seed: int = 0, m: int | None = B):
    xs = [_emb(B, seed + k) for k in range(4)]
    return xs + [_emb(m, seed + 4) if m else None]


def _keep_neg(k, i, valid, text, neg_text) -> bool:
    if valid is not None and not valid[k]:
        return False
    return neg_text is None or neg_text[k] != text[i]


def reference_blockwise(q, q2, p, p2, tau, negs=None, valid=None, text=None, neg_text=None, same_text=False):
    """Sum over the four (query form, target family) terms of a mean InfoNCE, loops over rows and columns."""
    terms = {}
    for name, (a, tgt) in zip(TERM_NAMES, [(q, p), (q, p2), (q2, p), (q2, p2)]):
        rows = []
        for i in range(len(a)):
            cols = [tgt[i]] + [
                tgt[j] for j in range(len(tgt)) if j != i and not (same_text and text[j] == text[i])
            ]
            if negs is not None:
                cols += [negs[k] for k in range(len(negs)) if _keep_neg(k, i, valid, text, neg_text)]
            logits = torch.stack([torch.dot(a[i], c) for c in cols]) / tau
            rows.append(torch.logsumexp(logits, 0) - logits[0])
        terms[name] = torch.stack(rows).mean()
    return sum(terms.values()), terms


def reference_joint(
    q, q2, p, p2, tau, negs=None, valid=None, text=None, neg_text=None, same_text=False, mask_other=True
):
    """Mean over the 4B augmented pairs of a CE over both target forms; the positive's other form excluded."""
    forms = {"p": p, "p2": p2}
    terms = {}
    for name, (a, pos_form) in zip(TERM_NAMES, [(q, "p"), (q, "p2"), (q2, "p"), (q2, "p2")]):
        rows = []
        for i in range(len(a)):
            cols = [forms[pos_form][i]]
            for form, tgt in forms.items():
                for j in range(len(tgt)):
                    if j == i and form == pos_form:
                        continue  # the positive, already first
                    if j == i and mask_other:
                        continue  # p_i^-: the other form of the positive
                    if j != i and same_text and text[j] == text[i]:
                        continue
                    cols.append(tgt[j])
            if negs is not None:
                cols += [negs[k] for k in range(len(negs)) if _keep_neg(k, i, valid, text, neg_text)]
            logits = torch.stack([torch.dot(a[i], c) for c in cols]) / tau
            rows.append(torch.logsumexp(logits, 0) - logits[0])
        terms[name] = torch.stack(rows).mean()
    return sum(terms.values()) / 4, terms


def _compare(fn, ref_fn, xs, tau=0.05, loss_kw=None, ref_kw=None):
    loss_kw, ref_kw = loss_kw or {}, ref_kw or {}
    has_neg = xs[4] is not None
    ins = [x.clone().requires_grad_() for x in xs if x is not None]
    out = fn(*ins[:4], tau=tau, negatives=ins[4] if has_neg else None, **loss_kw)
    out.loss.backward()
    refs = [x.double().requires_grad_() for x in xs if x is not None]
    ref, ref_terms = ref_fn(*refs[:4], tau, negs=refs[4] if has_neg else None, **ref_kw)
    ref.backward()
    assert out.loss.item() == pytest.approx(ref.item(), rel=1e-5)
    for name in TERM_NAMES:
        assert out.terms[name].item() == pytest.approx(ref_terms[name].item(), rel=1e-5)
    for a, b in zip(ins, refs):
        torch.testing.assert_close(a.grad.double(), b.grad, atol=2e-5, rtol=1e-4)
    return out


@pytest.mark.parametrize("m", [None, B, 3])
def test_blockwise_matches_reference(m):
    out = _compare(blockwise_loss, reference_blockwise, _batch(0, m))
    assert out.num_columns == B + (m or 0)
    assert out.loss.item() == pytest.approx(sum(v.item() for v in out.terms.values()), rel=1e-6)


@pytest.mark.parametrize("m", [None, B])
def test_joint_matches_reference(m):
    out = _compare(joint_masked_loss, reference_joint, _batch(10, m))
    assert out.num_columns == 2 * B + (m or 0)
    assert out.loss.item() == pytest.approx(sum(v.item() for v in out.terms.values()) / 4, rel=1e-6)
    # Each of the 4B rows masks exactly one column, the other form of its positive.
    assert out.masked_frac.item() == pytest.approx(1 / out.num_columns)


def test_invalid_and_same_text_negatives_masked_match_reference():
    valid = [True, False, True, True, False]
    text = [1, 2, 3, 1, 4]  # samples 0 and 3 share a target text
    neg_text = [2, 9, 8, 1, 7]  # negative 0 equals sample 1's target, negative 3 samples 0 and 3's
    kw = dict(
        negative_valid=torch.tensor(valid),
        positive_text_id=torch.tensor(text),
        negative_text_id=torch.tensor(neg_text),
        mask_same_text=True,
    )
    rkw = dict(valid=valid, text=text, neg_text=neg_text, same_text=True)
    _compare(blockwise_loss, reference_blockwise, _batch(20), loss_kw=kw, ref_kw=rkw)
    _compare(joint_masked_loss, reference_joint, _batch(30), loss_kw=kw, ref_kw=rkw)


def test_joint_without_mask_matches_unmasked_reference_and_differs():
    xs = _batch(40)
    out = _compare(
        joint_masked_loss,
        reference_joint,
        xs,
        loss_kw=dict(mask_other_form=False),
        ref_kw=dict(mask_other=False),
    )
    masked = joint_masked_loss(*xs[:4], tau=0.05, negatives=xs[4])
    assert masked.loss.item() < out.loss.item()  # removing columns can only lower each row's CE
    assert out.masked_frac.item() == 0.0


def test_joint_own_other_form_is_never_a_negative():
    """Perturbing p'_i leaves the (q_i, p_i) and (q'_i, p_i) rows untouched, but does move other rows."""
    q, q2, p, p2, negs = _batch(50)
    i = 2
    p2_pert = p2.clone()
    p2_pert[i] = q[i] + q2[i]  # would be a very hard negative for row i if it leaked
    rows_p = [0 * B + i, 2 * B + i]  # row index of (q_i, p_i) and (q'_i, p_i) in the [4B] row order

    def rows(p2_, **kw):
        return joint_masked_loss(q, q2, p, p2_, tau=0.02, negatives=negs, **kw).row_loss

    base, pert = rows(p2), rows(p2_pert)
    for r in rows_p:
        assert base[r] == pert[r]
    others = [r for r in range(2 * B) if r % B != i] + [2 * B + r for r in range(B) if r != i]
    assert not torch.equal(base[others], pert[others])  # p'_i is a negative for every other sample
    # The check has teeth: without the mask the same perturbation moves row (q_i, p_i).
    base_u, pert_u = rows(p2, mask_other_form=False), rows(p2_pert, mask_other_form=False)
    assert not torch.equal(base_u[rows_p[0]], pert_u[rows_p[0]])


def test_blockwise_terms_see_one_target_family():
    q, q2, p, p2, negs = _batch(60)
    base = blockwise_loss(q, q2, p, p2, tau=0.02, negatives=negs)
    pert = blockwise_loss(q, q2, p, p2 + torch.randn_like(p2), tau=0.02, negatives=negs)
    for name in ("q_p", "q2_p"):
        assert torch.equal(base.terms[name], pert.terms[name])
    for name in ("q_p2", "q2_p2"):
        assert not torch.equal(base.terms[name], pert.terms[name])


@pytest.mark.parametrize("fn", [blockwise_loss, joint_masked_loss])
def test_missing_negatives_do_not_influence_loss_or_gradients(fn):
    q, q2, p, p2, negs = _batch(70)
    valid = torch.tensor([True, False, True, True, False])

    def run(n_):
        ins = [x.clone().requires_grad_() for x in (q, q2, p, p2, n_)]
        out = fn(*ins[:4], tau=0.02, negatives=ins[4], negative_valid=valid)
        out.loss.backward()
        return [out.loss] + [x.grad for x in ins]

    negs2 = negs.clone()
    negs2[[1, 4]] = torch.randn(2, D) * 4
    for a, b in zip(run(negs), run(negs2)):
        assert torch.equal(a, b)


def test_input_validation():
    q, q2, p, p2, negs = _batch(80)
    with pytest.raises(ValueError):
        blockwise_loss(q, q2[:3], p, p2)
    with pytest.raises(ValueError):
        joint_masked_loss(q, q2, p, p2, negative_valid=torch.ones(B, dtype=torch.bool))
    with pytest.raises(ValueError):
        joint_masked_loss(q, q2, p, p2, negatives=negs, negative_text_id=torch.arange(B))


@pytest.mark.slow
def test_distributed_gradients_equal_single_process(dist_report):
    for name in ("blockwise_neg", "joint_neg"):
        errs = dist_report["cases"][name]
        for key, err in errs.items():
            if not key.endswith("_ref_norm"):
                assert err < 1e-5, (name, key, err)
        assert errs["fp2_ref_norm"] > 0.1 and errs["fneg_ref_norm"] > 0.1
