"""Sparse mixture-of-experts feed-forward: a router sends each token to its top-k experts.

Drop-in for the FFN slot of a block, (B, T, C) -> (B, T, C). Each expert is a SwiGLU MLP
of width d_ff. A linear router scores the experts per token; the token's output is the
weighted sum of its top-k experts:

- k = 1 (Switch): weight = the router's softmax probability of the chosen expert, so the
  router still gets a gradient through the output;
- k >= 2 (Mixtral): weights = softmax over the k chosen logits (they sum to 1).

Dispatch is sparse: the (token, expert) assignments are sorted by expert (stably, so in
token order), and each expert runs once on exactly the rows routed to it.

Capacity (``capacity_factor`` > 0): each expert takes at most
ceil(capacity_factor * tokens * k / n_experts) assignments, first come first served in
token order; the rest are dropped (that expert contributes zero to that token; the
block's residual connection carries the token through). 0 means no limit. Note that
with a limit, whether a token is dropped depends on the other tokens of the batch,
later ones included.

Auxiliary loss, stored in ``self.aux_loss`` after every forward (the caller adds it):

    balance_coef * E * sum_i f_i * P_i  +  z_coef * mean_tokens(logsumexp(logits)^2)

f_i = share of all top-k assignments (before capacity) given to expert i (sums to 1;
for k = 1 it is Switch's fraction of tokens dispatched to i), P_i = mean router
probability of expert i. f carries no gradient, P does, so the balance term pushes
probability away from overloaded experts; it equals balance_coef when routing is uniform.
The z-term keeps router logits small (ST-MoE).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


class Expert(nn.Module):
    """A SwiGLU MLP without biases: down(silu(gate(x)) * up(x))."""

    def __init__(self, d_model: int, d_ff: int):
        super().__init__()
        self.ff = d_ff
        self.gate_up = nn.Linear(d_model, 2 * d_ff, bias=False)
        self.down = nn.Linear(d_ff, d_model, bias=False)

    def forward(self, x):
        g, u = self.gate_up(x).split(self.ff, dim=-1)
        return self.down(F.silu(g) * u)


class MoEFeedForward(nn.Module):
    def __init__(self, d_model: int, d_ff: int, n_experts: int = 8, top_k: int = 2, capacity_factor: float = 0.0,
                 balance_coef: float = 0.01, z_coef: float = 1e-3):
        super().__init__()
        if not 1 <= top_k <= n_experts:
            raise ValueError(f"top_k ({top_k}) must be between 1 and n_experts ({n_experts})")
        if capacity_factor < 0:
            raise ValueError(f"capacity_factor ({capacity_factor}) must be >= 0 (0 = no limit)")
        self.n_experts, self.top_k = n_experts, top_k
        self.capacity_factor, self.balance_coef, self.z_coef = capacity_factor, balance_coef, z_coef
        self.router = nn.Linear(d_model, n_experts, bias=False)
        self.experts = nn.ModuleList(Expert(d_model, d_ff) for _ in range(n_experts))
        self.aux_loss: torch.Tensor | None = None
        self.last_load: torch.Tensor | None = None  # (E,) share of tokens with expert i among their top-k; sums to k
        self.last_dropped: float = 0.0  # share of the N*k assignments dropped by capacity

    def residual_projections(self):
        """Output projections of the residual branch (for GPT-2-style scaled init)."""
        for e in self.experts:
            yield e.down.weight

    def capacity(self, n_tokens: int) -> int | None:
        if self.capacity_factor <= 0:
            return None
        return math.ceil(self.capacity_factor * n_tokens * self.top_k / self.n_experts)

    def forward(self, x):
        B, T, C = x.shape
        E, K = self.n_experts, self.top_k
        flat = x.reshape(-1, C)  # (N, C)
        N = flat.shape[0]

        logits = self.router(flat).float()  # (N, E), routed in fp32
        probs = logits.softmax(dim=-1)
        top_logit, top_idx = logits.topk(K, dim=-1)  # (N, K) each, best first
        if K == 1:
            weight = probs.gather(1, top_idx)  # Switch: scale by the router probability
        else:
            weight = top_logit.softmax(dim=-1)  # Mixtral: renormalise over the chosen k

        # Assignments in token order (token n, choice j at row n*K + j), stably sorted by expert.
        expert_of = top_idx.reshape(-1)  # (N*K,)
        order = torch.argsort(expert_of, stable=True)
        counts = torch.bincount(expert_of, minlength=E)  # (E,)
        token_of = order // K  # (N*K,) the token of each sorted assignment
        w_sorted = weight.reshape(-1)[order]

        cap = self.capacity(N)
        kept = counts if cap is None else counts.clamp(max=cap)
        out = torch.zeros_like(flat)
        start = 0
        for e, (n_e, keep_e) in enumerate(zip(counts.tolist(), kept.tolist())):
            if keep_e:
                rows = token_of[start : start + keep_e]  # the first keep_e assignments, in token order
                y = self.experts[e](flat.index_select(0, rows))  # (keep_e, C)
                out.index_add_(0, rows, (y * w_sorted[start : start + keep_e, None]).to(out.dtype))
            start += n_e

        f = counts.to(probs.dtype) / max(N * K, 1)  # (E,) share of assignments, no gradient
        P = probs.mean(dim=0)  # (E,) mean router probability, with gradient
        balance = E * (f * P).sum()
        z = torch.logsumexp(logits, dim=-1).square().mean()
        self.aux_loss = self.balance_coef * balance + self.z_coef * z
        self.last_load = (counts.to(torch.float32) / max(N, 1)).detach()
        self.last_dropped = float((counts - kept).sum()) / max(N * K, 1)
        return out.view(B, T, C)
