"""Log-mel frames from a waveform, and back to a waveform by Griffin-Lim.

    samples (S,) --torch.stft (Hann, n_fft, hop)--> |X| (F, T) --mel filterbank (M, F)--> mel (M, T)
    log-mel (T, M) = log(max(mel, 1e-5))                          (frames first: one row per hop)

The filterbank is the HTK mel scale's triangles (mel = 2595 log10(1 + f / 700)) from 0 Hz to
``fmax``, each triangle's peak at 1 (no area normalisation), built in numpy once per config.

``griffin_lim(logmel)`` inverts it (Griffin & Lim 1984, with the "fast" momentum of Perraudin et
al. 2013): the magnitude spectrogram is the least-squares non-negative reading of the mel
magnitudes through the filterbank's pseudo-inverse; the phase starts random (seeded) and each
iteration keeps the phase of the STFT of the inverse STFT, with momentum 0.99. No torchaudio:
torch.stft / torch.istft only.
"""

from __future__ import annotations

import numpy as np
import torch

FLOOR = 1e-5  # mel magnitudes below this are silence: log-mel >= log(FLOOR)
SILENCE = float(np.log(FLOOR))


def _hz_to_mel(f):
    return 2595.0 * np.log10(1.0 + np.asarray(f, np.float64) / 700.0)


def _mel_to_hz(m):
    return 700.0 * (10.0 ** (np.asarray(m, np.float64) / 2595.0) - 1.0)


def mel_filterbank(sample_rate: int, n_fft: int, n_mels: int, fmax: float) -> np.ndarray:
    """(n_mels, n_fft // 2 + 1) triangles over the STFT bins, evenly spaced on the mel scale from 0 to fmax."""
    freqs = np.linspace(0, sample_rate / 2, n_fft // 2 + 1)
    edges = _mel_to_hz(np.linspace(0, _hz_to_mel(fmax), n_mels + 2))  # n_mels triangles: left, peak, right
    lo, mid, hi = edges[:-2, None], edges[1:-1, None], edges[2:, None]
    up = (freqs - lo) / np.maximum(mid - lo, 1e-9)
    down = (hi - freqs) / np.maximum(hi - mid, 1e-9)
    return np.clip(np.minimum(up, down), 0, None).astype(np.float32)


class MelSpec:
    """The log-mel transform of an ``AudioConfig`` (``audio.*``) and its Griffin-Lim inverse."""

    def __init__(self, ac):
        self.rate, self.n_fft, self.hop, self.n_mels = ac.sample_rate, ac.n_fft, ac.hop, ac.n_mels
        self.iters = ac.griffin_lim
        self.fb = torch.from_numpy(mel_filterbank(ac.sample_rate, ac.n_fft, ac.n_mels, ac.fmax))  # (M, F)
        self.window = torch.hann_window(self.n_fft)
        self._inverse = None  # the filterbank's pseudo-inverse (F, M), made on the first griffin_lim

    def _stft(self, x: torch.Tensor) -> torch.Tensor:
        return torch.stft(x, self.n_fft, self.hop, window=self.window, center=True, return_complex=True)  # (F, T)

    def logmel(self, samples: np.ndarray) -> np.ndarray:
        """(S,) float samples -> (T, n_mels) float32 log-mel frames, T = S // hop + 1."""
        x = torch.as_tensor(np.asarray(samples, np.float32))
        if len(x) < self.n_fft:
            x = torch.nn.functional.pad(x, (0, self.n_fft - len(x)))
        mel = self.fb @ self._stft(x).abs()  # (M, T)
        return torch.log(mel.clamp_min(FLOOR)).t().contiguous().numpy()

    def griffin_lim(self, logmel: np.ndarray, seed: int = 0) -> np.ndarray:
        """(T, n_mels) log-mel frames -> (≈ T * hop,) float32 samples, peak-normalised to 0.9."""
        mel = torch.exp(torch.as_tensor(np.asarray(logmel, np.float32))).t()  # (M, T)
        if self._inverse is None:
            self._inverse = torch.linalg.pinv(self.fb)
        mag = (self._inverse @ mel).clamp_min(0)  # (F, T) magnitudes
        length = (mag.shape[1] - 1) * self.hop
        gen = torch.Generator().manual_seed(seed)
        angle = torch.polar(torch.ones_like(mag), 2 * np.pi * torch.rand(mag.shape, generator=gen))
        previous = torch.zeros_like(angle)
        for _ in range(self.iters):
            wave = torch.istft(mag * angle, self.n_fft, self.hop, window=self.window, length=length)
            rebuilt = self._stft(wave)
            angle = rebuilt - 0.99 * previous  # momentum (fast Griffin-Lim)
            previous = rebuilt
            angle = angle / angle.abs().clamp_min(1e-8)
        wave = torch.istft(mag * angle, self.n_fft, self.hop, window=self.window, length=length)
        return (0.9 * wave / wave.abs().max().clamp_min(1e-8)).numpy().astype(np.float32)
