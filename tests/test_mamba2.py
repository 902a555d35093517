"""The Mamba-2 mixer: the chunked SSD form, the step-by-step recurrence and a plain loop over time
(written here, independently, as the ground truth) compute the same thing."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from worldloom.backbones.mamba2 import Mamba2Mixer, Mamba2State, ssd
from worldloom.config import Mamba2Config, ModelConfig
from worldloom.model import LWM
from worldloom.train.optim import param_groups

ATOL = 1e-5


def reference_ssd(x, dt, A, Bm, C, h0=None):
    """h_t = exp(Δ_t A) h_{t-1} + Δ_t x_t B_t^T ; y_t = h_t C_t, one time step at a time, per head."""
    B, T, H, P = x.shape
    h = torch.zeros(B, H, P, Bm.shape[-1], dtype=x.dtype) if h0 is None else h0
    ys = []
    for t in range(T):
        decay = torch.exp(dt[:, t] * A)[:, :, None, None]  # (B, H, 1, 1)
        h = decay * h + (dt[:, t, :, None] * x[:, t])[..., None] * Bm[:, t, None, None, :]
        ys.append((h * C[:, t, None, None, :]).sum(-1))
    return torch.stack(ys, 1), h


def reference_mixer(m: Mamba2Mixer, x):
    """The whole block from its definition: padded conv, sequential scan, D skip, RMSNorm(y * silu(z))."""
    T = x.shape[1]
    z, xbc, dt = m.in_proj(x).split((m.d_inner, m.d_inner + 2 * m.d_state, m.n_heads), dim=-1)
    conv = F.conv1d(xbc.transpose(1, 2), m.conv1d.weight, m.conv1d.bias, padding=m.d_conv - 1, groups=xbc.shape[-1])
    xbc = F.silu(conv[..., :T]).transpose(1, 2)  # keep the causal outputs
    xs, Bm, C = xbc.split((m.d_inner, m.d_state, m.d_state), dim=-1)
    xs = xs.unflatten(-1, (m.n_heads, m.head_dim))
    y, _ = reference_ssd(xs, F.softplus(dt + m.dt_bias), -torch.exp(m.A_log), Bm, C)
    g = ((y + m.D[:, None] * xs) * F.silu(z).unflatten(-1, (m.n_heads, m.head_dim))).flatten(-2)
    g = g * torch.rsqrt(g.square().mean(-1, keepdim=True) + m.norm_eps) * m.norm_weight
    return m.out_proj(g)


def mixer(chunk=4, seed=0, **kw) -> Mamba2Mixer:
    torch.manual_seed(seed)
    m = Mamba2Mixer(16, d_state=4, d_conv=4, expand=2, head_dim=8, chunk=chunk, **kw)
    with torch.no_grad():  # larger Δ than the init so decays are far from 1 and errors show
        m.dt_bias.add_(1.0)
        m.norm_weight.uniform_(0.5, 1.5)  # not all ones, so a missing gain would show
    return m


def ssd_inputs(B=2, T=13, H=3, P=4, N=5, dt_scale=1.0, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(B, T, H, P, generator=g, dtype=dtype)
    dt = F.softplus(torch.randn(B, T, H, generator=g, dtype=dtype)) * dt_scale
    A = -torch.rand(H, generator=g, dtype=dtype) * 4 - 0.1
    Bm, C = torch.randn(B, T, N, generator=g, dtype=dtype), torch.randn(B, T, N, generator=g, dtype=dtype)
    h0 = torch.randn(B, H, P, N, generator=g, dtype=dtype)
    return x, dt, A, Bm, C, h0


# ---------------------------------------------------------------- the SSD core


@pytest.mark.parametrize("chunk", [1, 3, 4, 5, 13, 64])
def test_ssd_matches_sequential_reference(chunk):
    x, dt, A, Bm, C, h0 = ssd_inputs(T=13)  # 13: not a multiple of 3, 4 or 5, shorter than 64
    y, h = ssd(x, dt, A, Bm, C, h0, chunk=chunk)
    y_ref, h_ref = reference_ssd(x, dt, A, Bm, C, h0)
    torch.testing.assert_close(y, y_ref, atol=ATOL, rtol=1e-5)
    torch.testing.assert_close(h, h_ref, atol=ATOL, rtol=1e-5)


def test_ssd_without_initial_state_and_empty_input():
    x, dt, A, Bm, C, _ = ssd_inputs(T=9)
    y, h = ssd(x, dt, A, Bm, C, None, chunk=4)
    y_ref, h_ref = reference_ssd(x, dt, A, Bm, C)
    torch.testing.assert_close(y, y_ref, atol=ATOL, rtol=1e-5)
    torch.testing.assert_close(h, h_ref, atol=ATOL, rtol=1e-5)
    y0, h0 = ssd(x[:, :0], dt[:, :0], A, Bm[:, :0], C[:, :0], h, chunk=4)
    assert y0.shape == (2, 0, 3, 4) and torch.equal(h0, h)
    with pytest.raises(ValueError, match="chunk"):
        ssd(x, dt, A, Bm, C, chunk=0)


def test_strong_decay_stays_finite_and_exact():
    """Δ·|A| up to hundreds per step, then almost no decay, inside one chunk. Every exponent is <= 0
    (no inf, no nan, also in the gradients), and the weak decays after the strong ones are not lost to
    rounding: the fp32 result stays within 1e-6 (relative to its scale) of an fp64 loop. Segment sums
    taken as differences cs_t - cs_s of one cumulative sum miss this by ~5e-5."""
    x, dt, A, Bm, C, h0 = ssd_inputs(T=40, dt_scale=30.0)
    dt[:, 8:] = 1e-4
    dt[:, 30] = 50.0  # and one more reset late in the chunk
    inputs = [t.clone().requires_grad_() for t in (x, dt, A, Bm, C, h0)]
    y, h = ssd(*inputs, chunk=64)
    y_ref, h_ref = reference_ssd(*(t.double() for t in (x, dt, A, Bm, C, h0)))
    assert torch.isfinite(y).all() and torch.isfinite(h).all()
    assert (y.double() - y_ref).abs().max() <= 1e-6 * y_ref.abs().max()
    assert (h.double() - h_ref).abs().max() <= 1e-6 * h_ref.abs().max()
    (y.sum() + h.sum()).backward()
    for t in inputs:
        assert torch.isfinite(t.grad).all()


def test_ssd_gradients_pass_gradcheck():
    """Autograd through the masked exponentials, the chunk loop and the padding of a short last chunk."""
    inputs = tuple(t.requires_grad_() for t in ssd_inputs(B=2, T=7, H=2, P=2, N=3, dtype=torch.float64))
    assert torch.autograd.gradcheck(lambda *xs: ssd(*xs, chunk=3), inputs)


def test_ssd_runs_in_fp32_under_bf16_autocast():
    x, dt, A, Bm, C, h0 = ssd_inputs(T=21)
    y32, h32 = ssd(x, dt, A, Bm, C, h0, chunk=8)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y, h = ssd(x, dt, A, Bm, C, h0, chunk=8)
        y_low, _ = ssd(x.bfloat16(), dt.bfloat16(), A, Bm.bfloat16(), C.bfloat16(), h0, chunk=8)
    assert y.dtype == h.dtype == y_low.dtype == torch.float32
    torch.testing.assert_close(y, y32, atol=1e-6, rtol=1e-6)  # bf16 matmuls would be off by ~1e-2
    torch.testing.assert_close(h, h32, atol=1e-6, rtol=1e-6)


# ---------------------------------------------------------------- the mixer


def test_forward_matches_reference_mixer():
    m = mixer(chunk=8)
    x = torch.randn(3, 21, 16)
    y, state = m(x)
    assert state is None and y.shape == x.shape
    torch.testing.assert_close(y, reference_mixer(m, x), atol=ATOL, rtol=1e-5)


def test_every_chunk_size_gives_the_same_output():
    x = torch.randn(2, 23, 16)
    ref = reference_mixer(mixer(), x)
    for chunk in (1, 2, 5, 7, 8, 23, 64):
        m = mixer(chunk=chunk)  # same seed: same weights
        y, s = m(x, return_state=True)
        torch.testing.assert_close(y, ref, atol=ATOL, rtol=1e-5, msg=f"chunk={chunk}")
        if chunk == 1:
            s1 = s
        torch.testing.assert_close(s.ssm, s1.ssm, atol=ATOL, rtol=1e-5, msg=f"chunk={chunk}")


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
    y2, s = m(x[:, k : k + 5], state=s)  # a block after the prefill, across a chunk boundary
    y3, s = m.step(x[:, k + 5 : k + 6], s)  # one decoding step
    y4, s = m(x[:, k + 6 :], state=s)  # the rest
    torch.testing.assert_close(torch.cat((y1, y2, y3, y4), 1), y_full, atol=ATOL, rtol=1e-5)
    torch.testing.assert_close(s.ssm, s_full.ssm, atol=ATOL, rtol=1e-5)
    torch.testing.assert_close(s.conv, s_full.conv, atol=ATOL, rtol=1e-5)


def test_valid_mask_makes_pads_invisible():
    """Left padding: a row with p pads computes (and goes on computing from its state) what its real
    tokens compute alone, with the same state; also when the pads arrive after a carried state."""
    m = mixer(chunk=4)
    x, more = torch.randn(3, 10, 16), torch.randn(3, 3, 16)
    pad = torch.tensor([0, 3, 7])
    valid = torch.arange(10)[None] >= pad[:, None]
    with torch.no_grad():
        y, st = m(x, return_state=True, valid=valid)
        y2, st2 = m(more, st)
        for r, p in enumerate(pad.tolist()):
            y0, s0 = m(x[r : r + 1, p:], return_state=True)
            y02, s02 = m(more[r : r + 1], s0)
            torch.testing.assert_close(y[r : r + 1, p:], y0, atol=1e-6, rtol=0)
            torch.testing.assert_close(y2[r : r + 1], y02, atol=1e-6, rtol=0)
            torch.testing.assert_close(st.ssm[r : r + 1], s0.ssm, atol=1e-6, rtol=0)
            torch.testing.assert_close(st.conv[r : r + 1], s0.conv, atol=1e-6, rtol=0)
        # invalid positions after a state (a prefill split inside the padding) leave it as it was
        s_mid = m(x[:, :2], return_state=True)[1]
        _, s_pad = m(x[:, 2:5], s_mid, valid=torch.zeros(3, 3, dtype=torch.bool))
        torch.testing.assert_close(s_pad.ssm, s_mid.ssm, atol=0, rtol=0)


def test_gradients_reach_every_parameter_and_match_reference():
    m = mixer(chunk=4)
    x = torch.randn(2, 10, 16, requires_grad=True)
    w = torch.randn(2, 10, 16)
    (m(x)[0] * w).sum().backward()
    grads = {n: p.grad.clone() for n, p in m.named_parameters()}
    gx = x.grad.clone()
    assert set(grads) == {"in_proj.weight", "conv1d.weight", "conv1d.bias", "dt_bias", "A_log", "D", "norm_weight",
                          "out_proj.weight"}
    for n, g in grads.items():
        assert torch.isfinite(g).all() and g.abs().sum() > 0, n
    m.zero_grad()
    x.grad = None
    (reference_mixer(m, x) * w).sum().backward()
    for n, p in m.named_parameters():
        torch.testing.assert_close(grads[n], p.grad, atol=1e-5, rtol=1e-4, msg=n)
    torch.testing.assert_close(gx, x.grad, atol=1e-5, rtol=1e-4)


def test_gradient_flows_into_the_carried_state():
    m = mixer(chunk=4)
    x = torch.randn(2, 9, 16)
    with torch.no_grad():
        s = m(torch.randn(2, 5, 16), return_state=True)[1]
    h0 = s.ssm.detach().clone().requires_grad_()
    m(x, Mamba2State(s.conv, h0))[0].sum().backward()
    assert torch.isfinite(h0.grad).all() and h0.grad.abs().sum() > 0


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
    assert isinstance(init, Mamba2State) and not init.conv.any() and not init.ssm.any()
    shapes.add((tuple(init.conv.shape), tuple(init.ssm.shape)))
    assert shapes == {((2, 32 + 2 * 4, 3), (2, 4, 8, 4))}


def test_bf16_autocast_keeps_the_core_in_fp32():
    m = mixer(chunk=4)
    x = torch.randn(2, 9, 16)
    y32, _ = m(x)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y16, s = m(x, return_state=True)
        y_step, s = m.step(x[:, :1], s)
        y16.float().square().mean().backward()
    assert s.ssm.dtype == torch.float32 and torch.isfinite(y16).all() and torch.isfinite(y_step).all()
    assert all(torch.isfinite(p.grad).all() for p in m.parameters())
    torch.testing.assert_close(y16.float(), y32, atol=0.05, rtol=0.05)


# ---------------------------------------------------------------- init, config


def test_init_and_arguments():
    torch.manual_seed(0)
    m = Mamba2Mixer(64, head_dim=32)
    assert (m.d_inner, m.n_heads, m.d_state, m.chunk) == (128, 4, 64, 64)
    assert m.in_proj.out_features == 2 * 128 + 2 * 64 + 4 and m.in_proj.bias is None and m.out_proj.bias is None
    dt = F.softplus(Mamba2Mixer(64, head_dim=1).dt_bias)  # 128 heads: the spread shows
    assert dt.min() >= 1e-3 * (1 - 1e-4) and dt.max() <= 1e-1 * (1 + 1e-4) and dt.max() / dt.min() > 10
    A = torch.exp(Mamba2Mixer(64, head_dim=1).A_log)
    assert A.min() >= 1.0 and A.max() <= 16.0 and A.max() - A.min() > 5
    assert torch.equal(m.D, torch.ones(4)) and torch.equal(m.norm_weight, torch.ones(128))
    with pytest.raises(ValueError, match="head_dim"):
        Mamba2Mixer(16, head_dim=12)
    with pytest.raises(ValueError, match="chunk"):
        Mamba2Mixer(16, head_dim=8, chunk=0)


def test_init_survives_model_init_and_no_decay_tags():
    torch.manual_seed(0)
    cfg = ModelConfig(backbone="hybrid", layers="mamba2,attn", n_layer=2, n_head=2, d_model=16, context=16,
                      vocab_size=11, mamba2=Mamba2Config(d_state=4, head_dim=4))
    model = LWM(cfg)
    m = model.backbone.blocks[0].mamba2
    assert isinstance(m, Mamba2Mixer) and m.chunk == 64 and m.n_heads == 8  # chunk=0 in the config: 64
    dt = F.softplus(m.dt_bias)
    assert dt.min() >= 1e-3 * (1 - 1e-4) and dt.max() <= 1e-1 * (1 + 1e-4)
    assert torch.equal(m.D, torch.ones(8)) and 1.0 <= torch.exp(m.A_log).min() <= torch.exp(m.A_log).max() <= 16.0
    assert model.backbone.blocks[0].out_projection() is m.out_proj.weight
    assert abs(m.out_proj.weight.std().item() - 0.02 / 2) < 0.25 * 0.01  # scaled as a residual projection
    no_decay = {id(p) for p in param_groups(model, 0.1)[1]["params"]}
    assert {id(m.A_log), id(m.D), id(m.dt_bias), id(m.norm_weight)} <= no_decay
    assert id(m.in_proj.weight) not in no_decay and id(m.out_proj.weight) not in no_decay
