"""Quantisers and the 2-bit packing, as pure functions of tensors.

- ``absmax_int8(w)``: weight-only int8, one scale per output channel (row): q = round(w / s),
  s = max|w_row| / 127, so q lies in [-127, 127] and w ≈ q · s.
- ``absmean_ternary(w)``: BitNet b1.58 (Ma et al. 2024, arXiv 2402.17764): one scale per matrix,
  γ = mean|w|; q = clip(round(w / γ), -1, 1), so w ≈ q · γ.
- ``absmax_tokens(x)``: 8-bit activations per token (row of the last dimension): q = clip(round(x · 127 /
  max|x|), -128, 127), x ≈ q · max|x| / 127 (the scale returned is max|x| / 127).
- ``pack_ternary`` / ``unpack_ternary``: {-1, 0, 1} stored as 2-bit codes (q + 1 ∈ {0, 1, 2}), four per
  byte along each row (weight j of a row in bits 2·(j mod 4) of byte j // 4); a row whose length is not
  a multiple of 4 is padded with code 1 (zero), cut off again on unpacking.
"""

from __future__ import annotations

import torch

EPS = 1e-5  # the floor of every scale (an all-zero row or matrix quantises to zeros)
PER_BYTE = 4  # ternary weights per packed byte


def absmax_int8(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(q int8 (N, K), scale fp32 (N,)) of a weight (N, K): per-output-channel absmax."""
    w = w.detach().float()
    scale = w.abs().amax(dim=1).clamp(min=EPS) / 127.0  # (N,)
    q = torch.round(w / scale[:, None]).clamp(-127, 127).to(torch.int8)
    return q, scale


def absmean_ternary(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(q int8 in {-1, 0, 1} shaped as w, scale fp32 () = mean|w|) of a weight: BitNet b1.58's absmean."""
    w = w.float()
    scale = w.abs().mean().clamp(min=EPS)
    q = torch.round(w / scale).clamp(-1, 1)
    return q.to(torch.int8), scale


def absmax_tokens(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(q, scale): q integer-valued (x's float dtype) in [-128, 127], scale (..., 1) = max|x| / 127 per row."""
    scale = x.abs().amax(dim=-1, keepdim=True).clamp(min=EPS) / 127.0
    return torch.round(x / scale).clamp(-128, 127), scale


def pack_ternary(q: torch.Tensor) -> torch.Tensor:
    """int {-1, 0, 1} (N, K) -> uint8 (N, ceil(K / 4)), four 2-bit codes per byte."""
    if q.dim() != 2:
        raise ValueError(f"pack_ternary takes a matrix, got shape {tuple(q.shape)}")
    N, K = q.shape
    pad = (-K) % PER_BYTE
    codes = (q.to(torch.int16) + 1).to(torch.uint8)  # (N, K) in {0, 1, 2}
    if pad:
        codes = torch.cat([codes, torch.ones(N, pad, dtype=torch.uint8)], dim=1)  # code 1 = weight 0
    codes = codes.view(N, -1, PER_BYTE)  # (N, ceil(K/4), 4): weight j at [j // 4, j % 4]
    shifts = torch.arange(0, 2 * PER_BYTE, 2, dtype=torch.uint8)  # (4,) bit offsets 0, 2, 4, 6
    return (codes << shifts).sum(dim=-1, dtype=torch.uint8)


def unpack_ternary(packed: torch.Tensor, cols: int) -> torch.Tensor:
    """uint8 (N, ceil(cols / 4)) -> int8 {-1, 0, 1} (N, cols); the inverse of pack_ternary."""
    N, B = packed.shape
    if B != -(-cols // PER_BYTE):
        raise ValueError(f"{B} packed bytes per row cannot hold {cols} ternary weights")
    shifts = torch.arange(0, 2 * PER_BYTE, 2, dtype=torch.uint8)
    codes = (packed[:, :, None] >> shifts) & 3  # (N, B, 4)
    return (codes.view(N, -1)[:, :cols].to(torch.int8) - 1).contiguous()
