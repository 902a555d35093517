"""Discrete bottlenecks of an image autoencoder: a vector quantiser with an EMA codebook, and FSQ.

Both map continuous vectors ``z`` (N, D) to codes (N,) and back, with a straight-through gradient:

- ``EMAQuantizer`` (VQ-VAE, van den Oord et al. 2017; the EMA codebook of Razavi et al. 2019):
  K code vectors of size D; a vector takes its nearest code; the codes are not trained by
  gradients but follow exponential moving averages of the vectors assigned to them
  (``decay``); the encoder is pulled towards its codes by the commitment loss
  ``beta * |z - sg(q)|^2``. A code whose EMA usage falls below ``dead`` (an average count per
  batch) is restarted at a random vector of the current batch: codebook collapse is the common
  failure of VQ training, and this keeps every code in use.
- ``FSQuantizer`` (finite scalar quantisation, Mentzer et al. 2023): each of D = len(levels)
  channels is bounded by tanh and rounded to one of ``levels[i]`` values; the code is the
  mixed-radix number of the D digits (K = prod(levels)). No codebook, no auxiliary loss.

``forward(z) -> Quantized(q, codes, loss, stats)``; ``embed(codes) -> q`` (decoding).
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
import torch.nn as nn
import torch.nn.functional as F


class Quantized(NamedTuple):
    q: torch.Tensor  # (N, D) quantised vectors, straight-through: gradients reach z
    codes: torch.Tensor  # (N,) int64
    loss: torch.Tensor  # scalar auxiliary loss (commitment; 0 for FSQ)
    stats: dict  # floats to log: perplexity (codes in use, exp of the entropy), restarts


def perplexity(codes: torch.Tensor, k: int) -> float:
    """exp(entropy) of the codes' use: how many of the k codes are effectively in use."""
    p = torch.bincount(codes, minlength=k).float() / max(codes.numel(), 1)
    return float(torch.exp(-(p * torch.log(p.clamp_min(1e-12))).sum()))


class EMAQuantizer(nn.Module):
    def __init__(self, codes: int, dim: int, beta: float = 0.25, decay: float = 0.99, dead: float = 0.03,
                 eps: float = 1e-5):
        super().__init__()
        self.k, self.dim, self.beta, self.decay, self.dead, self.eps = codes, dim, beta, decay, dead, eps
        embed = torch.randn(codes, dim) / math.sqrt(dim)
        self.register_buffer("codebook", embed)
        # EMA of the vectors assigned per batch; it starts at 3x the dead level, so an unused code is first
        # restarted after ~ln(3)/(1-decay) steps (110 at 0.99): once the encoder's outputs have settled
        start = 3.0 * dead if dead > 0 else 1.0
        self.register_buffer("usage", torch.full((codes,), start))
        self.register_buffer("sums", embed * start)  # EMA of their sum (codebook = sums / usage)

    @property
    def codebook_size(self) -> int:
        return self.k

    def nearest(self, z: torch.Tensor) -> torch.Tensor:
        """(N, D) -> (N,) the index of each vector's nearest code (squared Euclidean distance)."""
        d = z.pow(2).sum(1, keepdim=True) - 2 * z @ self.codebook.t() + self.codebook.pow(2).sum(1)  # (N, K)
        return d.argmin(1)

    def embed(self, codes: torch.Tensor) -> torch.Tensor:
        return F.embedding(codes, self.codebook)

    def forward(self, z: torch.Tensor) -> Quantized:
        z32 = z.float()
        codes = self.nearest(z32.detach())
        q = self.embed(codes)
        restarts = self._update(z32.detach(), codes) if self.training else 0
        loss = self.beta * F.mse_loss(z32, q.detach())
        q = z32 + (q - z32).detach()  # straight-through
        return Quantized(q.to(z.dtype), codes, loss, {"perplexity": perplexity(codes, self.k), "restarts": restarts})

    @torch.no_grad()
    def _update(self, z: torch.Tensor, codes: torch.Tensor) -> int:
        """The EMA step of the codebook, then restarts of dead codes; returns how many restarted."""
        onehot = F.one_hot(codes, self.k).type_as(z)  # (N, K)
        self.usage.mul_(self.decay).add_(onehot.sum(0), alpha=1 - self.decay)
        self.sums.mul_(self.decay).add_(onehot.t() @ z, alpha=1 - self.decay)
        n = self.usage.sum()
        smoothed = (self.usage + self.eps) / (n + self.k * self.eps) * n  # Laplace smoothing: no division by 0
        self.codebook.copy_(self.sums / smoothed.unsqueeze(1))
        dead = (self.usage < self.dead).nonzero().squeeze(1)
        if dead.numel():
            pick = torch.randint(0, z.shape[0], (dead.numel(),), device=z.device)
            self.codebook[dead] = z[pick]
            self.sums[dead] = z[pick]
            self.usage[dead] = 1.0
        return int(dead.numel())


class FSQuantizer(nn.Module):
    def __init__(self, levels: list[int] | tuple[int, ...]):
        super().__init__()
        if not levels or any(int(l) < 2 for l in levels):
            raise ValueError(f"FSQ levels must be integers >= 2, got {levels}")
        self.levels = [int(l) for l in levels]
        self.dim = len(self.levels)
        basis = torch.cumprod(torch.tensor([1] + self.levels[:-1]), 0)
        self.register_buffer("_levels", torch.tensor(self.levels, dtype=torch.float32), persistent=False)
        self.register_buffer("_basis", basis, persistent=False)

    @property
    def codebook_size(self) -> int:
        return math.prod(self.levels)

    def _bound(self, z: torch.Tensor) -> torch.Tensor:
        """Each channel squashed into (-(L-1)/2, (L-1)/2), shifted by 1/2 for an even L, so that it rounds to L values."""
        half = (self._levels - 1) * (1 + 1e-3) / 2
        offset = torch.where(self._levels % 2 == 0, 0.5, 0.0)
        shift = torch.atanh(offset / half)
        return torch.tanh(z + shift) * half - offset

    def forward(self, z: torch.Tensor) -> Quantized:
        b = self._bound(z.float())
        digits = b + (b.round() - b).detach()  # straight-through rounding: integers in [-L//2, (L-1)//2]
        codes = ((digits.detach().round() + self._levels.div(2).floor()).long() * self._basis).sum(1)
        q = digits / self._levels.div(2).floor()  # in [-1, 1]
        return Quantized(q.to(z.dtype), codes, z.new_zeros(()), {"perplexity": perplexity(codes, self.codebook_size)})

    def embed(self, codes: torch.Tensor) -> torch.Tensor:
        digits = (codes.unsqueeze(-1) // self._basis) % self._levels.long()  # (..., D) in [0, L)
        half = self._levels.div(2).floor()
        return (digits.float() - half) / half
