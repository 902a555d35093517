"""Linear attention (Katharopoulos et al. 2020): the chunkwise parallel form, the recurrent step and a naive
quadratic reference are one function; left padding is exact; a tiny model learns and decodes with its cache."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from worldloom.backbones import BACKBONES, MIXERS
from worldloom.backbones.linear_attention import LinearAttention, LinearAttentionState
from worldloom.config import ModelConfig, build_config
from worldloom.decode import SamplingConfig, generate_ids
from worldloom.errors import ConfigError
from worldloom.model import LWM

ATOL = 1e-5
D, H = 16, 2


def make(chunk: int = 4, seed: int = 0) -> LinearAttention:
    torch.manual_seed(seed)
    return LinearAttention(D, H, chunk=chunk)


def reference(m: LinearAttention, x: torch.Tensor) -> torch.Tensor:
    """o_t = sum_{s<=t} w_ts v_s / sum_{s<=t} w_ts with w_ts = phi(q_t) . phi(k_s), one (t, s) pair at a time."""
    B, T, C = x.shape
    d = C // H
    q, k, v = (t.view(B, T, H, d) for t in (x @ m.qkv.weight.T).split(C, dim=-1))
    phi = lambda t: torch.where(t > 0, t + 1.0, torch.exp(t))  # elu(t) + 1, written out
    q, k = phi(q), phi(k)
    out = torch.zeros(B, T, H, d)
    for t in range(T):
        w = torch.stack([(q[:, t] * k[:, s]).sum(-1) for s in range(t + 1)], dim=1)  # (B, t+1, H)
        out[:, t] = (w.unsqueeze(-1) * v[:, : t + 1]).sum(1) / w.sum(1).unsqueeze(-1)
    return out.reshape(B, T, C) @ m.proj.weight.T


def test_parallel_form_equals_naive_quadratic_reference():
    m = make(chunk=64)  # one chunk: the parallel form
    x = torch.randn(2, 11, D)
    y, _ = m(x)
    torch.testing.assert_close(y, reference(m, x), atol=ATOL, rtol=1e-5)


@pytest.mark.parametrize("chunk", [1, 3, 4, 5])
def test_chunked_equals_unchunked(chunk):
    x = torch.randn(2, 13, D)
    y_full, s_full = make(chunk=64)(x, return_state=True)
    y, s = make(chunk=chunk)(x, return_state=True)
    torch.testing.assert_close(y, y_full, atol=ATOL, rtol=0)
    torch.testing.assert_close(s.S, s_full.S, atol=ATOL, rtol=1e-6)
    torch.testing.assert_close(s.z, s_full.z, atol=ATOL, rtol=1e-6)


def test_recurrent_steps_equal_parallel_output_and_state():
    m = make(chunk=4).eval()
    x = torch.randn(2, 10, D)
    with torch.no_grad():
        full, s_full = m(x, return_state=True)
        state, steps = m.init_state(2), []
        for t in range(10):  # decoding from nothing, one token at a time
            y, state = m.step(x[:, t : t + 1], state)
            steps.append(y)
    torch.testing.assert_close(torch.cat(steps, 1), full, atol=ATOL, rtol=0)
    torch.testing.assert_close(state.S, s_full.S, atol=ATOL, rtol=1e-6)
    torch.testing.assert_close(state.z, s_full.z, atol=ATOL, rtol=1e-6)


def test_prefill_then_steps_then_chunk_equals_full_and_state_untouched():
    m = make(chunk=4)
    x = torch.randn(2, 17, D)
    with torch.no_grad():
        full, _ = m(x)
        prefill, st = m(x[:, :6], return_state=True)
        before = (st.S.clone(), st.z.clone())
        pieces = [prefill]
        for t in range(6, 9):
            y, st = m.step(x[:, t : t + 1], st)
            pieces.append(y)
        pieces.append(m(x[:, 9:], st)[0])  # 8 tokens: two chunks of 4 from a state
    torch.testing.assert_close(torch.cat(pieces, 1), full, atol=ATOL, rtol=0)
    _, st2 = m(x[:, 6:9], LinearAttentionState(*before), return_state=True)  # the parallel form from the same state
    torch.testing.assert_close(st2.S, st.S, atol=ATOL, rtol=1e-6)


def test_given_state_is_not_modified():
    m = make()
    _, st = m(torch.randn(1, 5, D), return_state=True)
    S, z = st.S.clone(), st.z.clone()
    m(torch.randn(1, 6, D), st)
    m.step(torch.randn(1, 1, D), st)
    assert torch.equal(st.S, S) and torch.equal(st.z, z)


def test_state_is_constant_size_and_holds_the_sums():
    m = make()
    for T in (1, 7, 30):
        x = torch.randn(3, T, D)
        _, st = m(x, return_state=True)
        assert st.S.shape == (3, H, D // H, D // H) and st.z.shape == (3, H, D // H)
        assert st.S.dtype == st.z.dtype == torch.float32
        k = F.elu((x @ m.qkv.weight.T)[..., D : 2 * D].view(3, T, H, D // H)) + 1  # phi(k) (B, T, H, d)
        torch.testing.assert_close(st.z, k.sum(1), atol=1e-4, rtol=1e-5)


def test_causal():
    m = make(chunk=3)
    x = torch.randn(1, 12, D)
    y, _ = m(x)
    x2 = x.clone()
    x2[:, 6] += 1.0
    y2, _ = m(x2)
    torch.testing.assert_close(y2[:, :6], y[:, :6], atol=0, rtol=0)
    assert (y2[:, 6:] - y[:, 6:]).abs().amax(dim=-1).min() > 1e-6  # the change reaches every later step


def test_left_padded_rows_equal_rows_alone():
    """Positions marked invalid (left padding, any input there) add nothing: the row's outputs, its state,
    and what it computes from that state are those of the real tokens alone."""
    m = make(chunk=4)
    x, more = torch.randn(3, 9, D) * 3, torch.randn(3, 4, D)
    pad = torch.tensor([3, 0, 8])
    valid = torch.arange(9)[None] >= pad[:, None]
    with torch.no_grad():
        y, st = m(x, return_state=True, valid=valid)
        y2, _ = m(more, st)
        for r, p in enumerate(pad.tolist()):
            y0, st0 = m(x[r : r + 1, p:], return_state=True)
            torch.testing.assert_close(y[r : r + 1, p:], y0, atol=ATOL, rtol=0)
            torch.testing.assert_close(st.S[r : r + 1], st0.S, atol=ATOL, rtol=1e-6)
            torch.testing.assert_close(st.z[r : r + 1], st0.z, atol=ATOL, rtol=1e-6)
            torch.testing.assert_close(y2[r : r + 1], m(more[r : r + 1], st0)[0], atol=ATOL, rtol=0)
    assert torch.isfinite(y).all()  # pad outputs (nothing seen yet) are zero, not 0/0


@pytest.mark.parametrize("chunk", [64, 4])
def test_gradients_finite_and_reach_every_parameter(chunk):
    m = make(chunk=chunk)
    x = torch.randn(2, 9, D, requires_grad=True)
    y, st = m(x, return_state=True)
    y2, _ = m.step(torch.randn(2, 1, D), st)
    ((y * torch.randn_like(y)).sum() + y2.sum() + st.S.sum()).backward()
    for name, p in m.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0 and torch.isfinite(p.grad).all(), name
    assert torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0


def test_bf16_autocast_keeps_the_core_in_fp32():
    m = make(chunk=4)
    x = torch.randn(2, 9, D)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y16, st = m(x, return_state=True)
        y_step, st2 = m.step(torch.randn(2, 1, D), st)
    assert st.S.dtype == st2.S.dtype == torch.float32 and torch.isfinite(y_step).all()
    torch.testing.assert_close(y16.float(), m(x)[0], atol=0.05, rtol=0.05)


def test_bad_arguments():
    with pytest.raises(ValueError, match="divisible"):
        LinearAttention(10, 3)
    with pytest.raises(ValueError, match="chunk"):
        LinearAttention(16, 2, chunk=0)


# ---------------------------------------------------------------- one module + one registration


def test_registered_as_mixer_and_backbone():
    assert "linear" in MIXERS and "linear" in BACKBONES
    cfg = ModelConfig(backbone="linear", n_layer=2, n_head=2, d_model=16, context=16, vocab_size=9, chunk=5)
    model = LWM(cfg)
    mixers = [b.linear for b in model.backbone.blocks]
    assert all(isinstance(m, LinearAttention) and m.chunk == 5 for m in mixers)
    names = {n for n, _ in model.named_parameters()}
    for i in range(2):
        assert {f"backbone.blocks.{i}.linear_norm.weight", f"backbone.blocks.{i}.linear.qkv.weight",
                f"backbone.blocks.{i}.linear.proj.weight"} <= names
    hybrid = build_config(None, ["model.backbone=hybrid", "model.n_layer=3", "model.layers=attn,linear,mamba"])
    assert hybrid.model.layer_kinds == ["attn", "linear", "mamba"]
    with pytest.raises(ConfigError, match="backbone=hybrid"):
        build_config(None, ["model.backbone=linear", "model.n_layer=2", "model.layers=linear,attn"])


def test_tiny_model_learns_and_generates_with_its_cache(monkeypatch):
    """A pure linear-attention model learns a cycle (loss falls), then greedy decoding through
    generate_ids with the cache (the O(1) step) continues it, token for token as without the cache."""
    V, period = 12, 7
    torch.manual_seed(0)
    model = LWM(ModelConfig(backbone="linear", n_layer=2, n_head=2, d_model=32, context=32, vocab_size=V, chunk=8))
    seq = torch.arange(200) * 3 % period + 2  # 2, 5, 8, 4, 7, 3, 6, 2, ...: a cycle through 7 tokens
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    losses = []
    for step in range(60):
        starts = torch.randint(0, len(seq) - 33, (8,))
        batch = torch.stack([seq[s : s + 33] for s in starts])
        logits = model(batch[:, :-1]).logits
        loss = F.cross_entropy(logits.reshape(-1, V), batch[:, 1:].reshape(-1))
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.3 * losses[0] and losses[-1] < 0.5, losses[::10]
    model.eval()
    steps = []
    real_step = LinearAttention.step
    monkeypatch.setattr(LinearAttention, "step", lambda self, x, s: steps.append(1) or real_step(self, x, s))
    prompts = [seq[:5].tolist(), seq[3:6].tolist()]
    sc = SamplingConfig(max_new_tokens=10, temperature=0.0)
    cached = torch.stack(list(generate_ids(model, prompts, sc)), 1).tolist()
    assert len(steps) > 0  # decoding went through the recurrent step
    assert cached == torch.stack(list(generate_ids(model, prompts, sc, use_cache=False)), 1).tolist()
    assert cached[0] == seq[5:15].tolist() and cached[1] == seq[6:16].tolist()
