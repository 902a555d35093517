"""A Mamba-2 mixer: the selective state-space layer in its "state-space duality" (SSD) form
(Dao & Gu, 2024, "Transformers are SSMs"), trained with matmuls and decoded as an RNN.

The ``d_inner`` channels are split into H heads of P channels. Each head runs one recurrence on a
(P, N) state whose decay is a single scalar per head and step, and B and C (N numbers per step)
are shared by all heads:

    h_t = exp(Δ_t A) h_{t-1} + Δ_t x_t B_t^T        h: (P, N) per head, A = -exp(A_log) < 0 a scalar
    y_t = h_t C_t + D x_t

Δ_t (one per head), B_t and C_t come from the input, as in Mamba-1 (mamba.py). The output is
gated and normalised, out_proj(RMSNorm(y * silu(z))), and decoding carries a constant-size state:
the last ``d_conv - 1`` inputs of the causal convolution and h.

Because the decay is a scalar, unrolling the recurrence inside a chunk of L steps is a masked
attention-like product. With a_r = Δ_r A and the segment sums

    S[t, s] = sum_{s < r <= t} a_r  (s <= t),        decay[t, s] = exp(S[t, s])  (0 above the diagonal)

and cs_t = sum_{r <= t} a_r (the decay since the chunk's start), one chunk's outputs are

    y_t = sum_{s <= t} (C_t · B_s) decay[t, s] Δ_s x_s          (within the chunk: Y_diag)
        + exp(cs_t) h_in C_t                                    (the state entering it: Y_off)

and the state it hands on is exp(cs_{L-1}) h_in + sum_s decay[L-1, s] Δ_s x_s B_s^T. Y_diag
is ((C B^T) ∘ decay) (Δ x), two (L x L) products per chunk; the chunk states are a (P x L) @
(L x N) product; Y_off is an (L x N) @ (N x P) one. Only the short recurrence carrying h from
chunk to chunk is a Python loop (T / L iterations, on (B, H, P, N) tensors).

Why this is fast on a CPU: Mamba-1's A is (d_inner, d_state), so every (channel, state) pair
decays differently and its scan is elementwise work on (B, T, d_inner, d_state) tensors,
bound by memory bandwidth. Here almost all the work is batched matrix products of L x L, L x P
and L x N blocks, which run at the BLAS kernels' arithmetic speed. The elementwise work is on
(B, H, T, L) masks: H·L numbers per token (512 at H = 8, L = 64) where Mamba-1 streams several
tensors of d_inner·d_state (8,192 at 512 x 16) per token through memory.

Numerics: S is a cumulative sum of the numbers a_r <= 0 placed below the diagonal, masked to
-inf above it BEFORE the exponential, so every exponent is <= 0 and nothing overflows however
strong the decay. The sums are accumulated directly for each (t, s), not as differences
cs_t - cs_s of one cumulative sum: after a strongly decaying step cs is large and the
difference would lose the small decay of the following steps to rounding. The core runs in
fp32 (fp64 stays fp64) even under autocast. Plain autograd computes the backward; it keeps a
few (B, H, T, L) masks, with L = 64 by default.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import ConfigError
from .mamba import _fp32
from .mixer import RecurrentMixer, register_mixer


@dataclass
class Mamba2State:
    """Per-layer recurrent state for decoding; its size does not depend on the sequence length."""

    conv: torch.Tensor  # (B, conv_dim, d_conv - 1) last inputs of the causal depthwise conv (x, B, C)
    ssm: torch.Tensor  # (B, H, P, N), fp32


def _segsum(a: torch.Tensor) -> torch.Tensor:
    """a (..., L) -> S (..., L, L) with S[t, s] = sum_{s < r <= t} a_r for s <= t and -inf above the diagonal.

    Each sum is accumulated on its own (a cumulative sum down the columns of a matrix holding a_t
    below the diagonal), so a small sum after a large a_r is exact, not a difference of two large
    numbers.
    """
    L = a.shape[-1]
    ones = torch.ones(L, L, dtype=torch.bool, device=a.device)
    S = a.unsqueeze(-1).expand(*a.shape, L).masked_fill(~ones.tril(-1), 0.0).cumsum(-2)  # [r, s] = a_r if r > s
    return S.masked_fill(~ones.tril(), float("-inf"))


def ssd(x: torch.Tensor, dt: torch.Tensor, A: torch.Tensor, Bm: torch.Tensor, C: torch.Tensor,
        h0: torch.Tensor | None = None, chunk: int = 64) -> tuple[torch.Tensor, torch.Tensor]:
    """y_t = h_t C_t with h_t = exp(Δ_t A) h_{t-1} + Δ_t x_t B_t^T per head, chunk by chunk, in fp32 (or fp64).

    x: (B, T, H, P); dt: (B, T, H); A: (H,); Bm, C: (B, T, N) shared by the heads; h0: (B, H, P, N)
    or None (zeros). Returns y (B, T, H, P) (without the D skip) and the final state (B, H, P, N).
    Any chunk > 0 gives the same result; a T that is not a multiple is padded with Δ = 0 steps.
    """
    if chunk <= 0:
        raise ValueError(f"chunk must be positive, got {chunk}")
    x, dt, A, Bm, C = (_fp32(t) for t in (x, dt, A, Bm, C))
    Bsz, T, H, P = x.shape
    N = Bm.shape[-1]
    h = x.new_zeros(Bsz, H, P, N) if h0 is None else h0.to(x.dtype)
    if T == 0:
        return x.new_zeros(Bsz, 0, H, P), h
    with torch.autocast(x.device.type, enabled=False):  # the matmuls would otherwise run in bf16
        L = min(chunk, T)
        n = -(-T // L)
        pad = n * L - T
        if pad:  # Δ = 0 steps at the end: decay 1, no input, so the final state is unchanged
            x, dt = F.pad(x, (0, 0, 0, 0, 0, pad)), F.pad(dt, (0, 0, 0, pad))
            Bm, C = F.pad(Bm, (0, 0, 0, pad)), F.pad(C, (0, 0, 0, pad))
        xdt = (x * dt.unsqueeze(-1)).reshape(Bsz, n, L, H, P).permute(0, 3, 1, 2, 4)  # (B, H, n, L, P)
        a = (dt * A).reshape(Bsz, n, L, H).permute(0, 3, 1, 2)  # (B, H, n, L), all <= 0
        Bc, Cc = Bm.reshape(Bsz, n, 1, L, N), C.reshape(Bsz, n, 1, L, N)
        decay = torch.exp(_segsum(a))  # (B, H, n, L, L), in [0, 1], 0 above the diagonal
        scores = (Cc @ Bc.transpose(-1, -2)).squeeze(2)  # (B, n, L, L): C_t · B_s, the same for every head
        y = (scores.unsqueeze(1) * decay) @ xdt  # (B, H, n, L, P): Y_diag
        to_end = decay[..., -1, :].unsqueeze(-1)  # (B, H, n, L, 1): decay from step s to the chunk's end
        states = (xdt * to_end).transpose(-1, -2) @ Bc.transpose(1, 2)  # (B, H, n, P, N): each chunk's own input
        cs = a.cumsum(-1)  # (B, H, n, L): log decay from the chunk's start through step t
        through = torch.exp(cs[..., -1, None, None]).unbind(2)  # n x (B, H, 1, 1): decay across a whole chunk
        entering = []
        for c, s in enumerate(states.unbind(2)):  # the only loop: T / L iterations carrying h
            entering.append(h)  # (unbind, not indexing: its backward stacks once instead of n full-size zeros)
            h = through[c] * h + s
        h_in = torch.stack(entering, 2)  # (B, H, n, P, N): the state entering each chunk
        y = y + torch.exp(cs).unsqueeze(-1) * (Cc.transpose(1, 2) @ h_in.transpose(-1, -2))  # + Y_off
        y = y.permute(0, 2, 3, 1, 4).reshape(Bsz, n * L, H, P)[:, :T]
    return y, h


class Mamba2Mixer(RecurrentMixer):
    """in_proj -> causal depthwise conv + SiLU on (x, B, C) -> SSD (+ D skip) -> RMSNorm(y * silu(z)) -> out_proj.

    One head per ``head_dim`` channels of ``d_inner = expand * d_model``, one group (B and C
    shared by all heads). `chunk` is the number of time steps per chunk of the training form;
    any positive value gives the same result.
    """

    dt_min, dt_max = 1e-3, 1e-1  # range of Δ at init (the paper's)
    A_init_range = (1.0, 16.0)  # -A uniform in this range at init

    def __init__(self, d_model: int, d_state: int = 64, d_conv: int = 4, expand: int = 2, head_dim: int = 64,
                 chunk: int = 64, norm_eps: float = 1e-5):
        super().__init__()
        self.d_model, self.d_state, self.d_conv = d_model, d_state, d_conv
        self.d_inner = expand * d_model
        if head_dim <= 0 or self.d_inner % head_dim:
            raise ValueError(f"d_inner = expand * d_model = {self.d_inner} must be divisible by head_dim ({head_dim})")
        if chunk <= 0:
            raise ValueError(f"chunk must be positive, got {chunk}")
        self.head_dim, self.n_heads, self.chunk, self.norm_eps = head_dim, self.d_inner // head_dim, chunk, norm_eps
        self.conv_dim = self.d_inner + 2 * d_state  # the convolution runs over (x, B, C)
        self.in_proj = nn.Linear(d_model, 2 * self.d_inner + 2 * d_state + self.n_heads, bias=False)
        self.conv1d = nn.Conv1d(self.conv_dim, self.conv_dim, d_conv, groups=self.conv_dim, bias=True)
        self.dt_bias = nn.Parameter(torch.empty(self.n_heads))
        self.A_log = nn.Parameter(torch.empty(self.n_heads))
        self.D = nn.Parameter(torch.empty(self.n_heads))
        self.norm_weight = nn.Parameter(torch.ones(self.d_inner))  # the gated RMSNorm's gain
        self.out_proj = nn.Linear(self.d_inner, d_model, bias=False)
        for p in (self.A_log, self.D, self.dt_bias):
            p._no_weight_decay = True  # as in Mamba; the optimizer may honour it
        self.reset_ssm_parameters()

    @torch.no_grad()
    def reset_ssm_parameters(self) -> None:
        """The SSM-specific init. Call it again after any generic init of every nn.Linear."""
        # Δ = softplus(dt_bias) log-uniform in [dt_min, dt_max]: bias = softplus^-1(Δ) = Δ + log(1 - exp(-Δ))
        lo, hi = math.log(self.dt_min), math.log(self.dt_max)
        dt = torch.exp(torch.rand(self.n_heads) * (hi - lo) + lo).clamp(min=1e-4)
        self.dt_bias.copy_(dt + torch.log(-torch.expm1(-dt)))
        a_lo, a_hi = self.A_init_range
        self.A_log.copy_(torch.log(torch.empty(self.n_heads).uniform_(a_lo, a_hi)))
        self.D.fill_(1.0)

    def init_state(self, batch: int, device=None, dtype=None) -> Mamba2State:
        device = device if device is not None else self.A_log.device
        dtype = dtype or self.in_proj.weight.dtype
        conv = torch.zeros(batch, self.conv_dim, self.d_conv - 1, device=device, dtype=dtype)
        ssm = torch.zeros(batch, self.n_heads, self.head_dim, self.d_state, device=device, dtype=torch.float32)
        return Mamba2State(conv, ssm)

    def _split(self, zxbcdt: torch.Tensor):
        """in_proj's output (..., *) -> z (..., d_inner), xBC (..., conv_dim), dt (..., H)."""
        return zxbcdt.split((self.d_inner, self.conv_dim, self.n_heads), dim=-1)

    def _output(self, y: torch.Tensor, z: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """out_proj(RMSNorm(y * silu(z))), the gate and the norm in fp32; y (..., d_inner) fp32."""
        g = F.rms_norm(y * F.silu(_fp32(z)), (self.d_inner,), _fp32(self.norm_weight), self.norm_eps)
        return self.out_proj(g.to(dtype))

    def forward(self, x: torch.Tensor, state: Mamba2State | None = None, return_state: bool = False,
                valid: torch.Tensor | None = None) -> tuple[torch.Tensor, Mamba2State | None]:
        """x (B, T, d_model) -> y (B, T, d_model); continues from `state` and returns the new one if asked.

        ``valid`` (B, T) bool, if given, marks the real tokens: at the others (left padding) the
        conv input is zeroed and Δ = 0 (so exp(Δ A) = 1 and no input enters), so the state after
        a pad prefix is exactly the state before it. Their outputs are meaningless.
        """
        B, T, _ = x.shape
        z, xbc, dt = self._split(self.in_proj(x))
        if valid is not None:
            xbc = xbc * valid.unsqueeze(-1).to(xbc.dtype)
        xbc = xbc.transpose(1, 2)  # (B, conv_dim, T)
        K = self.d_conv - 1
        past = state.conv.to(xbc.dtype) if state is not None else xbc.new_zeros(B, self.conv_dim, K)
        xp = torch.cat((past, xbc), dim=-1)  # (B, conv_dim, K + T): causal padding is the carried inputs
        xbc = F.silu(F.conv1d(xp, self.conv1d.weight, self.conv1d.bias, groups=self.conv_dim)).transpose(1, 2)
        xs, Bm, C = xbc.split((self.d_inner, self.d_state, self.d_state), dim=-1)
        dt = F.softplus(_fp32(dt) + _fp32(self.dt_bias))  # (B, T, H)
        if valid is not None:
            dt = dt * valid.unsqueeze(-1).to(dt.dtype)
        A = -torch.exp(_fp32(self.A_log))  # (H,)
        xs = _fp32(xs).unflatten(-1, (self.n_heads, self.head_dim))  # (B, T, H, P)
        y, h = ssd(xs, dt, A, Bm, C, state.ssm if state is not None else None, self.chunk)
        y = (y + xs * _fp32(self.D).unsqueeze(-1)).flatten(-2)  # (B, T, d_inner)
        out = self._output(y, z, x.dtype)
        if state is None and not return_state:
            return out, None
        return out, Mamba2State(xp[:, :, xp.shape[-1] - K :].clone(), h)  # not a view of xp

    def step(self, x: torch.Tensor, state: Mamba2State) -> tuple[torch.Tensor, Mamba2State]:
        """One decoding step: x (B, 1, d_model) -> y (B, 1, d_model), with O(1) work and state."""
        z, xbc, dt = self._split(self.in_proj(x[:, 0]))
        window = torch.cat((state.conv.to(xbc.dtype), xbc.unsqueeze(-1)), dim=-1)  # (B, conv_dim, d_conv)
        xbc = F.silu((window * self.conv1d.weight[:, 0]).sum(-1) + self.conv1d.bias)  # (B, conv_dim)
        xs, Bm, C = (_fp32(t) for t in xbc.split((self.d_inner, self.d_state, self.d_state), dim=-1))
        dt = F.softplus(_fp32(dt) + _fp32(self.dt_bias))  # (B, H)
        A = -torch.exp(_fp32(self.A_log))
        xs = xs.unflatten(-1, (self.n_heads, self.head_dim))  # (B, H, P)
        h = torch.exp(dt * A)[..., None, None] * _fp32(state.ssm)  # (B, H, P, N)
        h = h + (dt.unsqueeze(-1) * xs).unsqueeze(-1) * Bm[:, None, None]
        y = (h * C[:, None, None]).sum(-1) + xs * _fp32(self.D).unsqueeze(-1)  # (B, H, P)
        out = self._output(y.flatten(-2), z, x.dtype)
        return out.unsqueeze(1), Mamba2State(window[:, :, 1:], h)


def _check_mamba2(cfg) -> None:
    m = cfg.mamba2
    if (cfg.d_model * m.expand) % m.head_dim:
        raise ConfigError(f"model.d_model * model.mamba2.expand = {cfg.d_model * m.expand} must be divisible "
                          f"by model.mamba2.head_dim ({m.head_dim}) for mamba2 layers")


@register_mixer("mamba2", backbone="mamba2", check=_check_mamba2)
def build_mamba2(cfg) -> Mamba2Mixer:
    m = cfg.mamba2
    return Mamba2Mixer(cfg.d_model, d_state=m.d_state, d_conv=m.d_conv, expand=m.expand, head_dim=m.head_dim,
                       chunk=cfg.chunk or 64, norm_eps=cfg.norm_eps)
