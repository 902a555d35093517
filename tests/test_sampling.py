"""The one sampler alone (worldloom.inference.sampling): greedy, top-k, top-p, allowed ids, the
distribution it draws from, seeding, and its refusals."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from worldloom.inference.sampling import check_sampling, restrict, sample


def randn(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


# ---------------------------------------------------------------- greedy


@pytest.mark.parametrize("shape", [(50,), (16, 50), (2, 3, 50)])
def test_temperature_zero_is_argmax_for_any_leading_shape(shape):
    logits = randn(*shape)
    out = sample(logits, 0.0)
    assert out.shape == shape[:-1] and torch.equal(out, logits.argmax(-1))


def test_greedy_with_allowed_is_the_argmax_inside_the_range():
    logits = randn(8, 30, seed=1)
    out = sample(logits, 0.0, allowed=(10, 20))
    assert torch.equal(out, 10 + logits[:, 10:20].argmax(-1))


@pytest.mark.parametrize("kw", [dict(top_k=1), dict(top_p=1e-6), dict(top_k=1, top_p=0.5)])
def test_filters_that_leave_one_token_are_argmax(kw):
    g = torch.Generator().manual_seed(1)
    logits = randn(64, 50, seed=1)
    for _ in range(5):
        assert torch.equal(sample(logits, 1.0, generator=g, **kw), logits.argmax(-1))


def test_a_tiny_temperature_is_argmax():
    g = torch.Generator().manual_seed(1)
    logits = randn(64, 50, seed=1)
    assert torch.equal(sample(logits, 1e-4, generator=g), logits.argmax(-1))


# ---------------------------------------------------------------- top-k and top-p


@pytest.mark.parametrize("k", [2, 5])
def test_top_k_keeps_exactly_the_k_likeliest(k):
    g = torch.Generator().manual_seed(2)
    row = randn(50, seed=2) * 0.3  # nearly flat: without the filter every id would show up
    draws = sample(row.expand(4000, 50), 1.0, top_k=k, generator=g)
    assert set(draws.tolist()) == set(torch.topk(row, k).indices.tolist())


def test_top_k_keeps_ids_tied_with_the_kth():
    row = torch.tensor([3.0, 1.0, 2.0, 2.0, 0.0])  # k = 2: id 0, then ids 2 and 3 tie for second
    draws = sample(row.expand(4000, 5), 1.0, top_k=2, generator=torch.Generator().manual_seed(0))
    assert set(draws.tolist()) == {0, 2, 3}


@pytest.mark.parametrize("p, keep", [(0.45, {0}), (0.55, {0, 1}), (0.7, {0, 1}), (0.85, {0, 1, 2}), (1.0, {0, 1, 2, 3})])
def test_top_p_keeps_the_smallest_set_reaching_p(p, keep):
    probs = torch.tensor([0.5, 0.3, 0.15, 0.05], dtype=torch.float64)
    order = [1, 3, 0, 2]  # ids 1, 3, 0, 2 hold 0.5, 0.3, 0.15, 0.05
    logits = torch.empty(4, dtype=torch.float64)
    logits[order] = probs.log()
    g = torch.Generator().manual_seed(3)
    draws = sample(logits.float().expand(4000, 4), 1.0, top_p=p, generator=g)
    assert set(draws.tolist()) == {order[i] for i in keep}


# ---------------------------------------------------------------- allowed ids


def _allowed_ids(kind: str, rng: np.random.Generator, lead: tuple, V: int):
    """(allowed argument, (*lead, V) bool mask of what it allows), with at least one id per row."""
    if kind == "range":
        lo = int(rng.integers(V))
        hi = int(rng.integers(lo + 1, V + 1))
        mask = np.zeros((*lead, V), bool)
        mask[..., lo:hi] = True
        return (lo, hi), mask
    if kind == "rows":
        lo = rng.integers(V, size=lead)
        hi = lo + 1 + rng.integers(V - lo)  # lo < hi <= V
        ids = np.arange(V)
        return np.stack([lo, hi], -1), (ids >= lo[..., None]) & (ids < hi[..., None])
    mask = rng.random((*lead, V)) < 0.3
    mask[..., int(rng.integers(V))] = True
    return torch.from_numpy(mask), mask


@given(seed=st.integers(0, 2**31 - 1), kind=st.sampled_from(["range", "rows", "mask"]),
       lead=st.sampled_from([(1,), (7,), (3, 4)]), V=st.integers(1, 40),
       temperature=st.sampled_from([0.0, 0.5, 1.0, 3.0]), top_k=st.integers(0, 5),
       top_p=st.sampled_from([1.0, 0.9, 0.3, 1e-3]))
def test_ids_outside_the_allowed_ones_are_never_drawn(seed, kind, lead, V, temperature, top_k, top_p):
    rng = np.random.default_rng(seed)
    logits = torch.from_numpy(rng.normal(0, 3, (*lead, V))).float()
    logits[..., int(rng.integers(V))] = 50.0  # a likely id that is often not allowed
    allowed, mask = _allowed_ids(kind, rng, lead, V)
    g = torch.Generator().manual_seed(seed)
    for _ in range(3):
        ids = sample(logits, temperature, top_k=top_k, top_p=top_p, allowed=allowed, generator=g)
        assert ids.shape == lead
        assert np.take_along_axis(mask, ids.numpy()[..., None], -1).all()


def test_restrict_sets_minus_infinity_outside_each_rows_range():
    logits = randn(3, 10)
    ranges = np.array([[0, 2], [4, 5], [9, 10]])
    out = restrict(logits, ranges)
    for row, (lo, hi) in enumerate(ranges):
        assert torch.equal(out[row, lo:hi], logits[row, lo:hi])
        assert torch.isneginf(out[row, :lo]).all() and torch.isneginf(out[row, hi:]).all()
    assert restrict(logits, None) is logits


def test_allowed_that_leaves_a_row_nothing_is_refused():
    with pytest.raises(ValueError, match="without any id"):
        sample(randn(2, 10), 1.0, allowed=np.array([[0, 3], [5, 5]]))
    with pytest.raises(ValueError, match="without any id"):
        sample(randn(2, 10), 0.0, allowed=torch.zeros(2, 10, dtype=torch.bool))
    with pytest.raises(ValueError, match="last axis of 2"):
        sample(randn(2, 10), 1.0, allowed=np.array([0, 3, 5]))


# ---------------------------------------------------------------- the distribution and seeding


def test_draws_at_temperature_one_follow_the_softmax():
    """Chi-square goodness of fit over 10 ids (df 9): the 0.999 quantile is 27.88."""
    logits = torch.linspace(-1.5, 1.5, 10)
    n = 40_000
    draws = sample(logits.expand(n, 10), 1.0, generator=torch.Generator().manual_seed(4))
    observed = torch.bincount(draws, minlength=10).double()
    expected = logits.double().softmax(-1) * n
    chi2 = float(((observed - expected) ** 2 / expected).sum())
    assert chi2 < 27.88, chi2


def test_temperature_sharpens_and_flattens():
    logits = torch.tensor([0.0, 1.0])
    n = 20_000
    for t in (0.5, 2.0):
        draws = sample(logits.expand(n, 2), t, generator=torch.Generator().manual_seed(5))
        p1 = float(draws.float().mean())
        assert abs(p1 - torch.sigmoid(torch.tensor(1.0 / t)).item()) < 0.015


def test_same_seed_same_samples_and_another_seed_others():
    logits = randn(4, 6, 100, seed=6)

    def draw(seed):
        return sample(logits, 1.0, top_k=50, top_p=0.95, generator=torch.Generator().manual_seed(seed))

    assert torch.equal(draw(7), draw(7))
    assert not torch.equal(draw(7), draw(8))


def test_plain_sampling_is_multinomial_over_the_softmax():
    """With no filter, the draws are torch.multinomial over softmax(logits) rows with the same
    generator: what the world runner's former `pick` drew, so seeded world rollouts keep their values."""
    logits = restrict(randn(5, 3, 20, seed=9), (4, 12))
    ids = sample(logits, 1.0, generator=torch.Generator().manual_seed(10))
    flat = logits.softmax(-1).reshape(-1, 20)
    ref = torch.multinomial(flat, 1, generator=torch.Generator().manual_seed(10)).reshape(5, 3)
    assert torch.equal(ids, ref)


# ---------------------------------------------------------------- refusals


@pytest.mark.parametrize("kw, needle", [
    (dict(temperature=-0.1), "temperature"), (dict(temperature=math.nan), "temperature"),
    (dict(temperature=math.inf), "temperature"), (dict(temperature=1.0, top_k=-1), "top_k"),
    (dict(temperature=1.0, top_p=0.0), "top_p"), (dict(temperature=1.0, top_p=1.5), "top_p"),
    (dict(temperature=1.0, top_p=math.nan), "top_p"),
])
def test_bad_settings_are_one_line_value_errors(kw, needle):
    with pytest.raises(ValueError, match=needle) as e:
        check_sampling(**kw)
    assert "\n" not in str(e.value)
    with pytest.raises(ValueError, match=needle):
        sample(randn(2, 5), **kw)
