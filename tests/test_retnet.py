"""Multi-scale retention: the parallel, chunkwise and recurrent forms are one function."""

from __future__ import annotations

import math

import pytest
import torch

from worldloom.backbones.retnet import MultiScaleRetention, RetentionState, head_log_decays

ATOL = 1e-5


def make(chunk: int = 4, v_factor: int = 2, d_model: int = 16, n_head: int = 2, seed: int = 0):
    torch.manual_seed(seed)
    m = MultiScaleRetention(d_model, n_head, chunk=chunk, v_factor=v_factor)
    with torch.no_grad():  # non-trivial norm affine so it is exercised too
        m.norm.weight.normal_(1.0, 0.2)
        m.norm.bias.normal_(0.0, 0.2)
    return m


def test_decays_are_multi_scale():
    g = head_log_decays(4).exp().double()
    assert torch.allclose(g, torch.tensor([1 - 2.0**-5, 1 - 2.0**-6, 1 - 2.0**-7, 1 - 2.0**-8], dtype=torch.float64))
    assert head_log_decays(40)[-1] < 0  # still forgets where 1 - 2^-44 would round to 1


@pytest.mark.parametrize("v_factor", [1, 2])
def test_three_forms_agree(v_factor):
    m = make(chunk=4, v_factor=v_factor)
    x = torch.randn(2, 13, 16)  # 13 = 3 chunks of 4 + 1
    yp, _ = m(x, mode="parallel")
    yc, _ = m(x, mode="chunkwise")
    yr, _ = m(x, mode="recurrent")
    assert yp.shape == x.shape
    torch.testing.assert_close(yc, yp, atol=ATOL, rtol=0)
    torch.testing.assert_close(yr, yp, atol=ATOL, rtol=0)
    ya, _ = m(x)  # auto: T > chunk -> chunkwise
    torch.testing.assert_close(ya, yc, atol=0, rtol=0)


def test_final_states_agree_across_forms():
    m = make(chunk=4)
    x = torch.randn(2, 11, 16)
    states = [m(x, mode=mode, return_state=True)[1] for mode in ("parallel", "chunkwise", "recurrent")]
    for s in states:
        assert s.n == 11
        torch.testing.assert_close(s.S, states[0].S, atol=ATOL, rtol=0)


def test_continue_from_state_equals_full_forward():
    m = make(chunk=4)
    x = torch.randn(2, 21, 16)
    full, _ = m(x, mode="parallel")
    prefill, st = m(x[:, :7], mode="parallel", return_state=True)
    assert st.n == 7
    pieces = [prefill]
    for t in range(7, 12):  # decode one token at a time
        y, st = m(x[:, t : t + 1], state=st, mode="recurrent", return_state=True)
        pieces.append(y)
    assert st.n == 12
    y, st = m(x[:, 12:], state=st, mode="chunkwise", return_state=True)  # 9 tokens: chunks of 4, 4, 1
    pieces.append(y)
    assert st.n == 21
    torch.testing.assert_close(torch.cat(pieces, dim=1), full, atol=ATOL, rtol=0)
    # and the state after all that is the state of one pass
    _, st_full = m(x, mode="recurrent", return_state=True)
    torch.testing.assert_close(st.S, st_full.S, atol=ATOL, rtol=0)


def test_parallel_from_state_and_state_untouched():
    m = make(chunk=4)
    x = torch.randn(1, 10, 16)
    full, _ = m(x, mode="recurrent")
    _, st = m(x[:, :6], mode="chunkwise", return_state=True)
    before = st.S.clone()
    y, _ = m(x[:, 6:], state=st, mode="parallel")
    torch.testing.assert_close(y, full[:, 6:], atol=ATOL, rtol=0)
    assert torch.equal(st.S, before) and st.n == 6  # the given state is not modified


def test_empty_state_equals_no_state():
    m = make()
    x = torch.randn(2, 9, 16)
    y0, _ = m(x, mode="chunkwise")
    y1, _ = m(x, state=m.init_state(2), mode="chunkwise")
    torch.testing.assert_close(y1, y0, atol=ATOL, rtol=0)


def test_positions_are_absolute():
    """Continuing from a state at offset n uses positions n.. : a state that claims a different
    count changes the output (relative rotary between old keys and new queries)."""
    m = make()
    x = torch.randn(1, 8, 16)
    _, st = m(x[:, :5], mode="parallel", return_state=True)
    right, _ = m(x[:, 5:], state=st, mode="recurrent")
    wrong, _ = m(x[:, 5:], state=RetentionState(st.S, st.n + 3), mode="recurrent")
    assert (right - wrong).abs().max() > 1e-4


def test_state_shape_independent_of_length():
    m = make(v_factor=2)
    shapes = set()
    for T in (1, 3, 17):
        _, st = m(torch.randn(3, T, 16), return_state=True)
        assert st.n == T
        shapes.add(tuple(st.S.shape))
    assert shapes == {(3, 2, 8, 16)}
    assert tuple(m.init_state(3).S.shape) == (3, 2, 8, 16)


@pytest.mark.parametrize("mode", ["parallel", "chunkwise", "recurrent"])
def test_gradients_reach_every_parameter(mode):
    m = make(chunk=4)
    x = torch.randn(2, 9, 16, requires_grad=True)
    y, _ = m(x, mode=mode)
    (y * torch.randn_like(y)).sum().backward()
    for name, p in m.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0 and torch.isfinite(p.grad).all(), name
    assert x.grad.abs().sum() > 0


@pytest.mark.parametrize("mode", ["parallel", "chunkwise", "recurrent"])
def test_causal(mode):
    m = make(chunk=4)
    x = torch.randn(1, 12, 16)
    y, _ = m(x, mode=mode)
    x2 = x.clone()
    x2[:, 6] += 1.0
    y2, _ = m(x2, mode=mode)
    torch.testing.assert_close(y2[:, :6], y[:, :6], atol=0, rtol=0)
    assert (y2[:, 6:] - y[:, 6:]).abs().amax(dim=-1).min() > 1e-6  # the change reaches every later step


def test_long_sequence_stays_finite_and_exact():
    """A few hundred tokens: decays of the fast heads underflow inside the products, no NaN, forms still agree."""
    m = make(chunk=16, d_model=16, n_head=2)
    x = torch.randn(1, 300, 16)
    yc, sc = m(x, mode="chunkwise", return_state=True)
    yr, sr = m(x, mode="recurrent", return_state=True)
    assert torch.isfinite(yc).all() and torch.isfinite(sc.S).all()
    torch.testing.assert_close(yc, yr, atol=ATOL, rtol=0)
    torch.testing.assert_close(sc.S, sr.S, atol=1e-4, rtol=1e-5)
    with torch.no_grad():
        assert math.isfinite(float(m(x, mode="parallel")[0].abs().max()))


def test_bad_mode():
    with pytest.raises(ValueError, match="unknown retention mode"):
        make()(torch.randn(1, 2, 16), mode="fast")


def test_step_is_one_token_of_forward():
    """The decoding step (recurrent form) gives the chunkwise form's output and state for one token."""
    torch.manual_seed(0)
    m = MultiScaleRetention(32, 4, chunk=8).eval()
    with torch.no_grad():
        _, state = m(torch.randn(2, 13, 32), return_state=True)
        x = torch.randn(2, 1, 32)
        y, s = m.step(x, state)
        y_ref, s_ref = m(x, state, return_state=True)
    assert s.n == s_ref.n == 14
    assert torch.allclose(y, y_ref, atol=1e-5) and torch.allclose(s.S, s_ref.S, atol=1e-5)
    assert state.n == 13  # the given state is left as it was
