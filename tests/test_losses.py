"""The MMN loss: CTR BCE + alpha * CTCVR BCE reweighted by N / (K * N_c) within each mini-batch
(N_c the domain's count, K the number of domains present: the weights average 1)."""

from __future__ import annotations

import math

import pytest
import torch

from training.losses import PROB_EPS, domain_weights, mmn_loss

TYPES = torch.tensor([0, 0, 1, 1, 1, 0])
SCENARIOS = torch.tensor([0, 0, 0, 0, 1, 1])
P_CTR = torch.tensor([0.5, 0.2, 0.8, 0.4, 0.9, 0.1], dtype=torch.float64)
P_CVR = torch.tensor([0.5, 0.5, 0.25, 0.5, 0.1, 0.3], dtype=torch.float64)
CLICK = torch.tensor([1, 0, 1, 0, 1, 0], dtype=torch.float64)
CONV = torch.tensor([1, 0, 0, 0, 1, 0], dtype=torch.float64)


def _bce(p: float, y: float) -> float:
    return -(y * math.log(p) + (1 - y) * math.log(1 - p))


def test_domain_weights_hand_checked():
    # domains: (0,0) x2, (1,0) x2, (1,1) x1, (0,1) x1 in a batch of N=6, K=4 -> N / (K N_c)
    weights = domain_weights(TYPES, SCENARIOS)
    assert weights.tolist() == pytest.approx([0.75, 0.75, 0.75, 0.75, 1.5, 1.5])
    assert weights.mean().item() == pytest.approx(1.0)


def test_domain_weights_are_per_batch():
    # The same row, (0, 0), weighs N/(K N_c) of whatever batch it lands in.
    assert domain_weights(torch.tensor([0, 1]), torch.tensor([0, 0])).tolist() == [1.0, 1.0]
    got = domain_weights(torch.tensor([0, 0, 0, 1]), torch.tensor([0, 0, 0, 0])).tolist()
    assert got == pytest.approx([2 / 3, 2 / 3, 2 / 3, 2.0])
    # type/scenario ids must not collide when combined into a key (1,0) vs (0,10)
    assert domain_weights(torch.tensor([1, 0]), torch.tensor([0, 10])).tolist() == [1.0, 1.0]


@pytest.mark.parametrize("dynamic", [True, False])
@pytest.mark.parametrize("alpha", [1.0, 0.5])
def test_loss_hand_checked(dynamic, alpha):
    out = mmn_loss(P_CTR, P_CVR, CLICK, CONV, TYPES, SCENARIOS, alpha=alpha, dynamic_weight=dynamic)
    ctr = sum(_bce(p, y) for p, y in zip(P_CTR.tolist(), CLICK.tolist(), strict=True)) / 6
    ctcvr_terms = [_bce(a * b, y) for a, b, y in
                   zip(P_CTR.tolist(), P_CVR.tolist(), CONV.tolist(), strict=True)]
    weights = [0.75, 0.75, 0.75, 0.75, 1.5, 1.5] if dynamic else [1] * 6
    ctcvr = sum(w * v for w, v in zip(weights, ctcvr_terms, strict=True)) / 6
    assert out.ctr.item() == pytest.approx(ctr, rel=1e-12)
    assert out.ctcvr.item() == pytest.approx(ctcvr, rel=1e-12)
    assert out.total.item() == pytest.approx(ctr + alpha * ctcvr, rel=1e-12)
    if dynamic:  # equivalently: the mean over present domains of each domain's mean loss
        per_domain = [(ctcvr_terms[0] + ctcvr_terms[1]) / 2, (ctcvr_terms[2] + ctcvr_terms[3]) / 2,
                      ctcvr_terms[4], ctcvr_terms[5]]
        assert out.ctcvr.item() == pytest.approx(sum(per_domain) / 4, rel=1e-12)


def test_loss_uses_all_impressions_for_ctcvr():
    # An unclicked impression still contributes a CTCVR term (p_ctcvr against conversion=0).
    p_ctr = torch.tensor([0.5, 0.5], dtype=torch.float64)
    p_cvr = torch.tensor([0.5, 0.9], dtype=torch.float64, requires_grad=True)
    out = mmn_loss(p_ctr, p_cvr, torch.tensor([1.0, 0.0]), torch.tensor([0.0, 0.0]),
                   torch.tensor([0, 0]), torch.tensor([0, 0]), alpha=1.0, dynamic_weight=True)
    out.total.backward()
    assert p_cvr.grad[1] > 0  # the unclicked row pushes its p_cvr down through p_ctcvr


def test_loss_is_finite_at_saturated_probabilities():
    p = torch.tensor([0.0, 1.0, 1.0, 0.0], requires_grad=True)
    out = mmn_loss(p, p, torch.tensor([1.0, 0.0, 1.0, 0.0]), torch.tensor([1.0, 0.0, 1.0, 0.0]),
                   torch.tensor([0, 0, 1, 1]), torch.tensor([0, 1, 0, 1]), alpha=1.0,
                   dynamic_weight=True)
    assert torch.isfinite(out.total)
    assert out.ctr.item() <= -math.log(PROB_EPS) + 1e-3
    out.total.backward()
    assert torch.isfinite(p.grad).all()


def test_nan_prediction_gives_nan_loss_not_an_exception():
    p = torch.tensor([float("nan"), 0.5])
    out = mmn_loss(p, p, torch.tensor([1.0, 0.0]), torch.tensor([0.0, 0.0]),
                   torch.tensor([0, 0]), torch.tensor([0, 0]), alpha=1.0, dynamic_weight=True)
    assert torch.isnan(out.total)


def test_direct_cvr_term_is_the_clicked_rows_mean_bce():
    p_ctr = torch.tensor([0.5, 0.2, 0.4, 0.1])
    p_cvr = torch.tensor([0.3, 0.6, 0.8, 0.5])
    click = torch.tensor([1.0, 0.0, 1.0, 0.0])
    conversion = torch.tensor([1.0, 0.0, 0.0, 0.0])
    ids = torch.zeros(4, dtype=torch.long)
    plain = mmn_loss(p_ctr, p_cvr, click, conversion, ids, ids, alpha=1.0, dynamic_weight=False)
    direct = mmn_loss(p_ctr, p_cvr, click, conversion, ids, ids, alpha=1.0, dynamic_weight=False,
                      cvr_weight=0.5)
    expected = (-math.log(0.3) - math.log(1 - 0.8)) / 2  # clicked rows 0 and 2 only
    assert direct.total.item() == pytest.approx(plain.total.item() + 0.5 * expected, rel=1e-5)
    assert direct.ctcvr.item() == pytest.approx(plain.ctcvr.item())
    no_clicks = mmn_loss(p_ctr, p_cvr, torch.zeros(4), conversion * 0, ids, ids, alpha=1.0,
                         dynamic_weight=False, cvr_weight=0.5)
    assert torch.isfinite(no_clicks.total)
