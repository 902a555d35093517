"""Scalars as single tokens, by binning (the stream's reward)."""

from __future__ import annotations

import numpy as np


class ScalarBins:
    """A scalar in [lo, hi] (lo <= 0 < hi) as one token: 0 for exactly zero, 1..n for n equal bins of
    (0, hi], and when lo < 0, n+1..2n for n equal bins of [lo, 0) (Atari's -1 for a lost point,
    Crafter's health penalties).

    Decoding gives the bin's center (so the error is at most hi / 2n, or |lo| / 2n). Values outside
    [lo, hi] are clipped; with lo = 0 (the default, BabyAI's rewards) negative values become 0.
    """

    def __init__(self, n_bins: int, hi: float = 1.0, lo: float = 0.0):
        if not (lo <= 0.0 < hi):
            raise ValueError(f"reward bins need lo <= 0 < hi, got lo={lo}, hi={hi}")
        self.n_bins, self.hi, self.lo = n_bins, hi, lo

    @property
    def vocab_size(self) -> int:
        return 1 + self.n_bins * (2 if self.lo < 0 else 1)

    def encode_batch(self, x: np.ndarray) -> np.ndarray:
        x = np.clip(np.asarray(x, dtype=np.float64), self.lo, self.hi)
        n = self.n_bins
        up = np.clip(np.ceil(x / self.hi * n).astype(np.int64), 1, n)  # (0, hi/n] -> 1, ...
        if self.lo < 0:
            down = n + np.clip(np.ceil(x / self.lo * n).astype(np.int64), 1, n)  # [lo/n, 0) -> n + 1, ...
            up = np.where(x < 0, down, up)
        return np.where(np.abs(x) <= 1e-9, 0, up)

    def decode_batch(self, ids: np.ndarray) -> np.ndarray:
        n = self.n_bins
        ids = np.clip(np.asarray(ids, dtype=np.int64), 0, self.vocab_size - 1)
        centers = np.where(ids > n, (ids - n - 0.5) / n * self.lo, (ids - 0.5) / n * self.hi)
        return np.where(ids == 0, 0.0, centers).astype(np.float32)
