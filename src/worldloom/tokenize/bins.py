"""Scalars as single tokens, by binning (the stream's reward)."""

from __future__ import annotations

import numpy as np


class ScalarBins:
    """A scalar in [0, hi] as one token: 0 for exactly zero, 1..n for n equal bins of (0, hi].

    Decoding gives the bin's center (so the error is at most hi / 2n). Values below 0 or
    above ``hi`` are clipped.
    """

    def __init__(self, n_bins: int, hi: float = 1.0):
        self.n_bins, self.hi = n_bins, hi

    @property
    def vocab_size(self) -> int:
        return self.n_bins + 1

    def encode_batch(self, x: np.ndarray) -> np.ndarray:
        x = np.clip(np.asarray(x, dtype=np.float64), 0.0, self.hi)
        b = np.ceil(x / self.hi * self.n_bins).astype(np.int64)  # (0, hi/n] -> 1, ...
        return np.where(x <= 1e-9, 0, np.clip(b, 1, self.n_bins))

    def decode_batch(self, ids: np.ndarray) -> np.ndarray:
        ids = np.clip(np.asarray(ids, dtype=np.int64), 0, self.n_bins)
        centers = (ids - 0.5) / self.n_bins * self.hi
        return np.where(ids == 0, 0.0, centers).astype(np.float32)
