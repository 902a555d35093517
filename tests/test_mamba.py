"""The Mamba mixer: the chunked parallel scan, the step-by-step recurrence and a plain loop over
time (written here, independently, as the ground truth) compute the same thing."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from worldloom.backbones.mamba import MambaMixer, MambaState, selective_scan

ATOL = 1e-5


def reference_scan(u, dt, A, Bm, C, h0=None):
    """h_t = exp(Δ_t A) h_{t-1} + Δ_t B_t u_t ; y_t = C_t · h_t, one time step at a time."""
    B, T, D = u.shape
    h = torch.zeros(B, D, A.shape[1]) if h0 is None else h0
    ys = []
    for t in range(T):
        h = torch.exp(dt[:, t, :, None] * A) * h + (dt[:, t] * u[:, t])[:, :, None] * Bm[:, t, None, :]
        ys.append((h * C[:, t, None, :]).sum(-1))
    return torch.stack(ys, 1), h


def reference_mixer(m: MambaMixer, x):
    """The whole block from its definition: padded conv, sequential scan, D skip, silu(z) gate."""
    T = x.shape[1]
    xb, z = m.in_proj(x).chunk(2, dim=-1)
    conv = F.conv1d(xb.transpose(1, 2), m.conv1d.weight, m.conv1d.bias, padding=m.d_conv - 1, groups=m.d_inner)
    xc = F.silu(conv[..., :T]).transpose(1, 2)  # keep the causal outputs
    dt, Bm, C = m.x_proj(xc).split((m.dt_rank, m.d_state, m.d_state), dim=-1)
    dt = F.softplus(m.dt_proj(dt))
    y, _ = reference_scan(xc, dt, -torch.exp(m.A_log), Bm, C)
    return m.out_proj((y + xc * m.D) * F.silu(z))


def mixer(chunk=8, seed=0, **kw) -> MambaMixer:
    torch.manual_seed(seed)
    m = MambaMixer(16, d_state=4, d_conv=4, expand=2, chunk=chunk, **kw)
    with torch.no_grad():  # larger Δ than the init so decays are far from 1 and errors show
        m.dt_proj.bias.add_(1.0)
    return m


def scan_inputs(B=2, T=13, D=6, N=3, dt_scale=1.0, seed=0):
    g = torch.Generator().manual_seed(seed)
    u = torch.randn(B, T, D, generator=g)
    dt = F.softplus(torch.randn(B, T, D, generator=g)) * dt_scale
    A = -torch.rand(D, N, generator=g) * 4 - 0.1
    Bm, C = torch.randn(B, T, N, generator=g), torch.randn(B, T, N, generator=g)
    h0 = torch.randn(B, D, N, generator=g)
    return u, dt, A, Bm, C, h0


@pytest.mark.parametrize("chunk", [1, 4, 5, 64])
def test_scan_matches_sequential_reference(chunk):
    u, dt, A, Bm, C, h0 = scan_inputs(T=13)  # 13 is not a multiple of 4 or 5, and shorter than 64
    y, h = selective_scan(u, dt, A, Bm, C, h0, chunk=chunk)
    y_ref, h_ref = reference_scan(u, dt, A, Bm, C, h0)
    torch.testing.assert_close(y, y_ref, atol=ATOL, rtol=1e-5)
    torch.testing.assert_close(h, h_ref, atol=ATOL, rtol=1e-5)


def test_scan_is_stable_under_strong_and_weak_decay():
    u, dt, A, Bm, C, h0 = scan_inputs(T=40, dt_scale=30.0)  # Δ·|A| up to hundreds per step
    dt[:, 20:] = 1e-4  # then almost no decay at all
    y, h = selective_scan(u, dt, A, Bm, C, h0, chunk=32)
    y_ref, h_ref = reference_scan(u, dt, A, Bm, C, h0)
    assert torch.isfinite(y).all() and torch.isfinite(h).all()
    torch.testing.assert_close(y, y_ref, atol=ATOL, rtol=1e-5)


def test_forward_matches_reference_mixer():
    m = mixer(chunk=8)
    x = torch.randn(3, 21, 16)
    y, state = m(x)
    assert state is None and y.shape == x.shape
    torch.testing.assert_close(y, reference_mixer(m, x), atol=ATOL, rtol=1e-5)


def test_automatic_chunk_depends_on_batch_and_matches_the_reference():
    m = mixer(chunk=0)
    m.CHUNK_NUMBERS = 2 * m.d_inner * m.d_state * 4  # small budget so the choice changes within tiny batches
    assert m.chunk_for(1) == 8 and m.chunk_for(2) == 4 and m.chunk_for(64) == 4  # power of two, at least 4
    for B in (1, 3):
        x = torch.randn(B, 21, 16)  # 21 steps: several chunks and a short last one
        torch.testing.assert_close(m(x)[0], reference_mixer(m, x), atol=ATOL, rtol=1e-5)
    with pytest.raises(ValueError, match="chunk"):
        MambaMixer(16, chunk=-1)


def test_steps_match_forward_and_final_state():
    m = mixer(chunk=4)
    x = torch.randn(2, 11, 16)
    y_par, s_par = m(x, return_state=True)
    s = m.init_state(2)
    ys = []
    for t in range(x.shape[1]):
        y_t, s = m.step(x[:, t : t + 1], s)
        ys.append(y_t)
    torch.testing.assert_close(torch.cat(ys, 1), y_par, atol=ATOL, rtol=1e-5)
    torch.testing.assert_close(s.conv, s_par.conv, atol=ATOL, rtol=1e-5)
    torch.testing.assert_close(s.ssm, s_par.ssm, atol=ATOL, rtol=1e-5)


@pytest.mark.parametrize("k", [1, 3, 8, 10])
def test_prefill_then_continue_equals_full_forward(k):
    m = mixer(chunk=4)
    x = torch.randn(2, 17, 16)
    y_full, s_full = m(x, return_state=True)
    y1, s = m(x[:, :k], return_state=True)
    y2, s = m(x[:, k : k + 5], state=s)  # a block after the prefill
    y3, s = m.step(x[:, k + 5 : k + 6], s)  # one decoding step
    y4, s = m(x[:, k + 6 :], state=s)  # the rest, possibly one token at a time
    torch.testing.assert_close(torch.cat((y1, y2, y3, y4), 1), y_full, atol=ATOL, rtol=1e-5)
    torch.testing.assert_close(s.ssm, s_full.ssm, atol=ATOL, rtol=1e-5)
    torch.testing.assert_close(s.conv, s_full.conv, atol=ATOL, rtol=1e-5)


def test_gradients_reach_every_parameter_and_match_reference():
    m = mixer(chunk=4)
    x = torch.randn(2, 10, 16, requires_grad=True)
    w = torch.randn(2, 10, 16)
    (m(x)[0] * w).sum().backward()
    grads = {n: p.grad.clone() for n, p in m.named_parameters()}
    gx = x.grad.clone()
    for n, g in grads.items():
        assert g is not None and g.abs().sum() > 0, n
    m.zero_grad()
    x.grad = None
    (reference_mixer(m, x) * w).sum().backward()
    for n, p in m.named_parameters():
        torch.testing.assert_close(grads[n], p.grad, atol=1e-5, rtol=1e-4, msg=n)
    torch.testing.assert_close(gx, x.grad, atol=1e-5, rtol=1e-4)


def test_hand_written_backward_passes_gradcheck():
    u, dt, A, Bm, C, h0 = (t.double().requires_grad_() for t in scan_inputs(B=2, T=7, D=3, N=2))
    assert torch.autograd.gradcheck(lambda *xs: selective_scan(*xs, chunk=3), (u, dt, A, Bm, C, h0))


def test_gradient_flows_into_the_carried_state():
    u, dt, A, Bm, C, h0 = scan_inputs(T=9)
    h0.requires_grad_(True)
    (selective_scan(u, dt, A, Bm, C, h0, chunk=4)[0].sum()).backward()
    g = h0.grad.clone()
    h0.grad = None
    reference_scan(u, dt, A, Bm, C, h0)[0].sum().backward()
    torch.testing.assert_close(g, h0.grad, atol=ATOL, rtol=1e-5)


def test_causal():
    m = mixer(chunk=4)
    x = torch.randn(1, 15, 16)
    y, _ = m(x)
    t = 9
    x2 = x.clone()
    x2[:, t] += 1.0
    y2, _ = m(x2)
    assert torch.equal(y2[:, :t], y[:, :t])
    assert not torch.allclose(y2[:, t], y[:, t])


def test_state_size_does_not_depend_on_length():
    m = mixer(chunk=4)
    shapes = set()
    for T in (1, 3, 4, 9, 33):
        _, s = m(torch.randn(2, T, 16), return_state=True)
        shapes.add((tuple(s.conv.shape), tuple(s.ssm.shape)))
    _, s = m.step(torch.randn(2, 1, 16), s)
    shapes.add((tuple(s.conv.shape), tuple(s.ssm.shape)))
    init = m.init_state(2)
    assert isinstance(init, MambaState) and not init.conv.any() and not init.ssm.any()
    shapes.add((tuple(init.conv.shape), tuple(init.ssm.shape)))
    assert shapes == {((2, m.d_inner, m.d_conv - 1), (2, m.d_inner, m.d_state))}


def test_init_follows_the_paper():
    torch.manual_seed(0)
    m = MambaMixer(64, d_state=8)
    assert m.dt_rank == 4 and m.d_inner == 128
    assert m.in_proj.bias is None and m.out_proj.bias is None
    dt = F.softplus(m.dt_proj.bias)
    assert dt.min() >= 1e-3 * (1 - 1e-4) and dt.max() <= 1e-1 * (1 + 1e-4)
    assert dt.max() / dt.min() > 10  # spread over the range, not a constant
    torch.testing.assert_close(-torch.exp(m.A_log), -torch.arange(1.0, 9.0).expand(128, 8))
    assert torch.equal(m.D, torch.ones(128))


def test_bf16_autocast_keeps_the_scan_in_fp32():
    m = mixer(chunk=4)
    x = torch.randn(2, 9, 16)
    y32, _ = m(x)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y16, s = m(x, return_state=True)
        y_step, s = m.step(x[:, :1], s)
    assert s.ssm.dtype == torch.float32 and torch.isfinite(y16).all() and torch.isfinite(y_step).all()
    torch.testing.assert_close(y16.float(), y32, atol=0.05, rtol=0.05)
