"""Sparse mixture-of-experts FFN against a token-by-token reference."""

from __future__ import annotations

import math

import pytest
import torch

from worldloom.backbones.moe import MoEFeedForward

C, FF, E = 8, 12, 4


def make(top_k: int, capacity_factor: float = 0.0, seed: int = 0, **kw) -> MoEFeedForward:
    torch.manual_seed(seed)
    return MoEFeedForward(C, FF, n_experts=E, top_k=top_k, capacity_factor=capacity_factor, **kw)


def reference(m: MoEFeedForward, x: torch.Tensor, capacity: int | None = None):
    """Slow path: one token at a time, first come first served per expert. Returns (out, dropped mask (N, k))."""
    flat = x.reshape(-1, x.shape[-1])
    out = torch.zeros_like(flat)
    used = [0] * m.n_experts
    dropped = torch.zeros(flat.shape[0], m.top_k, dtype=torch.bool)
    for n in range(flat.shape[0]):
        logits = m.router(flat[n])
        top, idx = logits.topk(m.top_k)
        w = logits.softmax(-1)[idx] if m.top_k == 1 else top.softmax(-1)
        for j in range(m.top_k):
            e = int(idx[j])
            if capacity is not None and used[e] >= capacity:
                dropped[n, j] = True
                continue
            used[e] += 1
            out[n] += w[j] * m.experts[e](flat[n])
    return out.view_as(x), dropped


@pytest.mark.parametrize("top_k", [1, 2])
def test_matches_reference(top_k):
    m = make(top_k)
    x = torch.randn(2, 7, C)
    y = m(x)
    ref, _ = reference(m, x)
    assert y.shape == x.shape
    torch.testing.assert_close(y, ref, atol=1e-6, rtol=1e-5)
    assert m.last_dropped == 0.0


@pytest.mark.parametrize("top_k", [1, 2])
def test_capacity_drops_in_token_order(top_k):
    m = make(top_k, capacity_factor=0.5)
    x = torch.randn(2, 8, C)  # 16 tokens
    cap = math.ceil(0.5 * 16 * top_k / E)
    assert m.capacity(16) == cap
    y = m(x)
    ref, dropped = reference(m, x, capacity=cap)
    assert dropped.any()
    torch.testing.assert_close(y, ref, atol=1e-6, rtol=1e-5)
    assert m.last_dropped == pytest.approx(dropped.float().mean().item())
    assert m.last_dropped > 0
    gone = dropped.all(dim=1).view(2, 8)  # tokens with every assignment dropped
    if top_k == 1:
        assert gone.any()
    assert torch.equal(y[gone], torch.zeros_like(y[gone]))


def test_dispatch_is_sparse():
    """Each expert runs once, on exactly the rows routed to it (not on all tokens)."""
    m = make(top_k=2)
    rows = {}
    for e, ex in enumerate(m.experts):
        ex.register_forward_hook(lambda mod, inp, out, e=e: rows.setdefault(e, []).append(inp[0].shape[0]))
    x = torch.randn(3, 5, C)
    m(x)
    counts = torch.bincount(m.router(x.reshape(-1, C)).topk(2, dim=-1).indices.reshape(-1), minlength=E)
    assert all(len(v) == 1 for v in rows.values())
    assert {e: v[0] for e, v in rows.items()} == {e: int(c) for e, c in enumerate(counts) if c > 0}
    assert sum(v[0] for v in rows.values()) == 15 * 2


@pytest.mark.parametrize("balance_coef, z_coef", [(0.01, 0.0), (0.0, 1e-3), (0.01, 1e-3)])
def test_aux_loss_alone_reaches_router(balance_coef, z_coef):
    """Each term on its own (and both) sends a gradient to the router weight."""
    m = make(top_k=2, balance_coef=balance_coef, z_coef=z_coef)
    x = torch.randn(2, 6, C)
    y = m(x)
    (y * 0).sum().backward(retain_graph=True)  # the main output contributes nothing
    assert m.router.weight.grad is None or m.router.weight.grad.abs().sum() == 0
    m.zero_grad(set_to_none=True)
    m.aux_loss.backward()
    assert m.aux_loss.dim() == 0
    assert m.router.weight.grad is not None and m.router.weight.grad.abs().sum() > 0
    for ex in m.experts:  # the auxiliary loss touches only the router
        assert all(p.grad is None for p in ex.parameters())


def test_balance_loss_by_hand():
    """E=2, d_model=2, router = identity, so the logits are the inputs themselves."""
    m = MoEFeedForward(2, 4, n_experts=2, top_k=1, balance_coef=1.0, z_coef=0.0)
    with torch.no_grad():
        m.router.weight.copy_(torch.eye(2))
    tokens = [(2.0, 0.0), (0.0, 1.0), (3.0, 0.0), (1.0, 0.0)]  # top-1 experts: 0, 1, 0, 0
    m(torch.tensor([tokens]))
    p0 = [math.exp(a) / (math.exp(a) + math.exp(b)) for a, b in tokens]
    P = [sum(p0) / 4, sum(1 - p for p in p0) / 4]
    f = [3 / 4, 1 / 4]
    expected = 2 * (f[0] * P[0] + f[1] * P[1])
    assert m.aux_loss.item() == pytest.approx(expected, rel=1e-6)
    assert m.last_load.tolist() == pytest.approx(f)

    # the z-term alone: mean of logsumexp(logits)^2
    m.balance_coef, m.z_coef = 0.0, 0.5
    m(torch.tensor([tokens]))
    z = sum(math.log(math.exp(a) + math.exp(b)) ** 2 for a, b in tokens) / 4
    assert m.aux_loss.item() == pytest.approx(0.5 * z, rel=1e-6)


def test_balance_loss_is_coef_when_uniform():
    """Router weight zero: every probability is 1/E; f sums to 1, so E * sum f P = 1."""
    m = make(top_k=2, balance_coef=0.01, z_coef=0.0)
    with torch.no_grad():
        m.router.weight.zero_()
    m(torch.randn(1, 10, C))
    assert m.aux_loss.item() == pytest.approx(0.01, rel=1e-6)


@pytest.mark.parametrize("top_k", [1, 2])
def test_last_load(top_k):
    m = make(top_k)
    x = torch.randn(4, 8, C)
    m(x)
    idx = m.router(x.reshape(-1, C)).topk(top_k, dim=-1).indices  # (32, k)
    expected = torch.stack([(idx == e).any(dim=1).float().mean() for e in range(E)])
    assert m.last_load.shape == (E,) and not m.last_load.requires_grad
    torch.testing.assert_close(m.last_load, expected)
    assert m.last_load.sum().item() == pytest.approx(top_k)  # each token counted once per chosen expert
    assert (m.last_load <= 1).all()


@pytest.mark.parametrize("top_k", [1, 2])
def test_gradients_reach_used_experts(top_k):
    m = make(top_k)
    with torch.no_grad():  # feature 0 is constant 1 and steers every token away from the last expert
        m.router.weight[-1, 0] = -100.0
    x = torch.randn(3, 6, C)
    x[..., 0] = 1.0
    y = m(x)
    (y * torch.randn_like(y)).sum().backward()
    assert m.last_load[-1] == 0
    assert m.router.weight.grad.abs().sum() > 0
    for e, ex in enumerate(m.experts):
        if m.last_load[e] > 0:
            for p in ex.parameters():
                assert p.grad is not None and p.grad.abs().sum() > 0, e
        else:
            assert all(p.grad is None for p in ex.parameters())
    assert sum(m.last_load[:-1] > 0) >= 2
