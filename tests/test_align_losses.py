"""DPO, IPO, ORPO and Bradley–Terry losses against hand-worked values, and at extreme log-probabilities."""

import math

import pytest
import torch

from worldloom.losses.align import bradley_terry_loss, dpo_loss, log1mexp, orpo_loss, sequence_logprobs


def t(*v):
    return torch.tensor(v, dtype=torch.float32, requires_grad=True)


def test_sequence_logprobs_sums_only_weighted_tokens():
    logits = torch.log(torch.tensor([[[0.5, 0.25, 0.25], [0.1, 0.8, 0.1], [0.2, 0.2, 0.6]]]))
    targets = torch.tensor([[0, 1, 2]])
    weight = torch.tensor([[0.0, 1.0, 1.0]])
    s, n = sequence_logprobs(logits, targets, weight)
    assert s.item() == pytest.approx(math.log(0.8) + math.log(0.6), abs=1e-6) and n.item() == 2


def test_dpo_hand_worked():
    # log-ratios: chosen -1 - (-2) = 1, rejected -3 - (-2.5) = -0.5, h = 1.5; beta 0.1 -> -log sigmoid(0.15)
    out = dpo_loss(t(-1.0), t(-3.0), t(-2.0), t(-2.5), beta=0.1)
    assert out.total.item() == pytest.approx(-math.log(1 / (1 + math.exp(-0.15))), abs=1e-6)
    assert out.parts["reward_chosen"] == pytest.approx(0.1) and out.parts["reward_rejected"] == pytest.approx(-0.05)
    assert out.parts["reward_acc"] == 1.0
    # at the start (policy == reference) the loss is log 2 whatever the log-probabilities
    assert dpo_loss(t(-5.0, -1.0), t(-7.0, -0.5), t(-5.0, -1.0), t(-7.0, -0.5), 0.5).total.item() == pytest.approx(math.log(2))


def test_ipo_hand_worked_and_gradient_direction():
    pc, pr = t(-1.0), t(-3.0)
    out = dpo_loss(pc, pr, t(-2.0), t(-2.5), beta=0.25, kind="ipo")  # h = 1.5, target 1/(2*0.25) = 2 -> (1.5-2)^2
    assert out.total.item() == pytest.approx(0.25)
    out.total.backward()
    assert pc.grad.item() < 0 < pr.grad.item()  # below the target margin: raise chosen, lower rejected


def test_dpo_extreme_logprobs_are_finite():
    pc, pr = t(-1e4, -1e-9), t(-1e-9, -1e4)
    for kind in ("sigmoid", "ipo"):
        out = dpo_loss(pc, pr, t(0.0, 0.0), t(0.0, 0.0), beta=0.1, kind=kind)
        out.total.backward()
        assert math.isfinite(out.total.item()) and torch.isfinite(pc.grad).all() and torch.isfinite(pr.grad).all()
        pc.grad = pr.grad = None


def test_log1mexp_both_ends():
    x = torch.tensor([-1e-9, -1e-3, -0.5, -5.0, -50.0], dtype=torch.float64)
    expect = torch.log(1 - torch.exp(x))
    got = log1mexp(x)
    assert torch.allclose(got[1:], expect[1:], rtol=1e-9)
    assert torch.isfinite(got).all()


def test_orpo_hand_worked():
    lw, ll = math.log(0.5), math.log(0.2)  # odds 1 and 0.25 -> log odds ratio log 4
    out = orpo_loss(torch.tensor(0.7), t(lw), t(ll), lam=0.1)
    ratio = -math.log(1 / (1 + math.exp(-math.log(4.0))))  # -log sigmoid(log 4) = log(1.25)
    assert out.parts["odds_ratio"] == pytest.approx(ratio, abs=1e-6)
    assert out.total.item() == pytest.approx(0.7 + 0.1 * ratio, abs=1e-6)


def test_orpo_extreme_logprobs_are_finite():
    lw, ll = t(-1e-12, -80.0), t(-80.0, -1e-12)
    out = orpo_loss(torch.tensor(1.0), lw, ll, lam=1.0)
    out.total.backward()
    assert math.isfinite(out.total.item()) and torch.isfinite(lw.grad).all() and torch.isfinite(ll.grad).all()


def test_bradley_terry_hand_worked():
    rc, rr = t(2.0, 0.0), t(1.0, 1.0)
    out = bradley_terry_loss(rc, rr)
    expect = (math.log1p(math.exp(-1.0)) + math.log1p(math.exp(1.0))) / 2
    assert out.total.item() == pytest.approx(expect, abs=1e-6)
    assert out.parts["reward_acc"] == 0.5
    out.total.backward()
    assert (rc.grad < 0).all() and (rr.grad > 0).all()
    big = bradley_terry_loss(t(1e4), t(-1e4))
    assert big.total.item() == pytest.approx(0.0, abs=1e-6)
