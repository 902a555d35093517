"""Linear attention (Katharopoulos et al., 2020, "Transformers are RNNs"): attention through a kernel, decoded as an RNN.

Softmax attention weighs value v_s by exp(q_t . k_s). Replace that similarity by a kernel
phi(q_t) . phi(k_s) with a positive feature map, here phi(x) = elu(x) + 1, and causal
attention regroups into running sums (per head):

    o_t = phi(q_t)^T S_t / (phi(q_t) . z_t + eps)     S_t = sum_{s <= t} phi(k_s) v_s^T    z_t = sum_{s <= t} phi(k_s)

Two equivalent forms:

- parallel (training): A = phi(Q) phi(K)^T with the causal mask, O = (A V) / (A 1 + eps).
  It runs chunk by chunk: parallel inside a chunk of ``chunk`` tokens, the sums (S, z)
  carried across chunks, so memory is O(T * chunk) rather than O(T^2). The parallel form is
  one chunk; any chunk gives the same result.
- recurrent (decoding, ``step``): S += phi(k) v^T, z += phi(k), then read o with phi(q).
  The state is H * d_k * (d_v + 1) numbers whatever the length: O(1) per token.

There is no positional encoding (as in the paper): order reaches the layer only through
causality; in a hybrid, the attention layers carry rotary positions. Every weight phi(q) . phi(k)
is positive, so each output is a convex mix of the values seen and the denominator is at least
the token's own weight; ``eps`` only matters where nothing has been seen (left padding). Under
left padding phi(k) is zeroed at the pads, so they add nothing to S, z or any output. The core
(feature map, sums, products) runs in fp32 whatever the input dtype or autocast setting.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .mixer import RecurrentMixer, register_mixer


@dataclass
class LinearAttentionState:
    """One layer's recurrent state, fp32: S (B, H, d_k, d_v) = sum phi(k) v^T and z (B, H, d_k) = sum phi(k)."""

    S: torch.Tensor
    z: torch.Tensor


def feature_map(x: torch.Tensor) -> torch.Tensor:
    """phi(x) = elu(x) + 1: positive everywhere, x + 1 for x > 0."""
    return F.elu(x) + 1.0


class LinearAttention(RecurrentMixer):
    """out = W_o(LinearAttention(phi(X W_q), phi(X W_k), X W_v)), n_head heads of d_model / n_head channels."""

    eps = 1e-6

    def __init__(self, d_model: int, n_head: int, chunk: int = 64):
        super().__init__()
        if d_model % n_head:
            raise ValueError(f"d_model ({d_model}) must be divisible by n_head ({n_head})")
        if chunk < 1:
            raise ValueError(f"chunk must be >= 1, got {chunk}")
        self.n_head, self.dk, self.chunk = n_head, d_model // n_head, chunk
        self.qkv = nn.Linear(d_model, 3 * d_model, bias=False)
        self.proj = nn.Linear(d_model, d_model, bias=False)

    def init_state(self, batch: int, device=None) -> LinearAttentionState:
        """The empty state (nothing seen)."""
        H, d = self.n_head, self.dk
        return LinearAttentionState(torch.zeros(batch, H, d, d, device=device), torch.zeros(batch, H, d, device=device))

    def _heads(self, x: torch.Tensor):
        """x (B, T, C) -> phi(q), phi(k), v, each (B, H, T, d) in fp32."""
        B, T, _ = x.shape
        q, k, v = self.qkv(x).view(B, T, 3, self.n_head, self.dk).permute(2, 0, 3, 1, 4)  # 3 x (B, H, T, d)
        with torch.autocast(x.device.type, enabled=False):
            return feature_map(q.float()), feature_map(k.float()), v.float()

    def _out(self, o: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """o (B, H, T, d) -> W_o o, (B, T, C)."""
        B, H, T, d = o.shape
        return self.proj(o.transpose(1, 2).reshape(B, T, H * d).to(dtype))

    def forward(self, x, state: LinearAttentionState | None = None, return_state: bool = False,
                valid: torch.Tensor | None = None):
        """x (B, T, C) -> (y (B, T, C), the state after x if ``return_state`` else None).

        Continues from ``state`` (never modified in place). ``valid`` (B, T) bool, if given,
        marks the real tokens: the others (left padding) add nothing; their outputs are meaningless.
        """
        q, k, v = self._heads(x)
        if state is None:
            state = self.init_state(x.shape[0], x.device)
        with torch.autocast(x.device.type, enabled=False):
            if valid is not None:
                k = k * valid[:, None, :, None].to(k.dtype)
            o, S, z = self._chunkwise(q, k, v, state.S.float(), state.z.float())
        return self._out(o, x.dtype), (LinearAttentionState(S, z) if return_state else None)

    def _chunkwise(self, q, k, v, S, z):
        """Parallel within chunks, the sums carried across them. q, k, v (B, H, T, d); S (B, H, d, d); z (B, H, d)."""
        outs = []
        for s in range(0, q.shape[2], self.chunk):
            qc, kc, vc = q[:, :, s : s + self.chunk], k[:, :, s : s + self.chunk], v[:, :, s : s + self.chunk]  # (B, H, L, d)
            A = (qc @ kc.transpose(-1, -2)).tril()  # (B, H, L, L): phi(q_i) . phi(k_j) for j <= i
            num = A @ vc + qc @ S  # (B, H, L, d): this chunk's tokens, then everything before it
            den = A.sum(-1, keepdim=True) + qc @ z.unsqueeze(-1)  # (B, H, L, 1)
            outs.append(num / (den + self.eps))
            S = S + kc.transpose(-1, -2) @ vc
            z = z + kc.sum(2)
        o = torch.cat(outs, dim=2) if outs else v.new_zeros(v.shape)
        return o, S, z

    def step(self, x, state: LinearAttentionState) -> tuple[torch.Tensor, LinearAttentionState]:
        """One decoding step through the recurrent form: x (B, 1, C) -> y (B, 1, C), O(1) work and state."""
        q, k, v = self._heads(x)  # (B, H, 1, d)
        with torch.autocast(x.device.type, enabled=False):
            S = state.S.float() + k.transpose(-1, -2) @ v  # (B, H, d, d): add phi(k) v^T
            z = state.z.float() + k[:, :, 0]  # (B, H, d)
            o = (q @ S) / (q @ z.unsqueeze(-1) + self.eps)  # (B, H, 1, d)
        return self._out(o, x.dtype), LinearAttentionState(S, z)


@register_mixer("linear", backbone="linear")
def build_linear(cfg) -> LinearAttention:
    return LinearAttention(cfg.d_model, cfg.n_head, chunk=cfg.chunk or 64)
