"""A 1-D convolutional autoencoder over log-mel frames with vision's VQ bottleneck: speech <-> codes.

    log-mel (B, T, M) --normalise--> (B, M, T) --encoder--> z (B, D, T/s) --EMAQuantizer--> codes (B, T/s)
    codes --embed--> q (B, D, T/s) --decoder--> log-mel (B, T, M)

One code covers ``audio.stack`` = s consecutive mel frames: the encoder is a 3-wide convolution,
``log2(s)`` stride-2 convolutions, two residual blocks at the code rate and a 1x1 projection to the
code size; the decoder mirrors it with transposed convolutions. The quantiser is vision's
``EMAQuantizer`` (EMA codebook, dead-code restarts, commitment loss, straight-through), and the
forward pass returns vision's ``VisionOutput``, so the image tokenizer's objective
(``losses.image_objective``: reconstruction MSE + commitment) trains it unchanged. The MSE is taken
on normalised log-mel values ((x - MEAN) / SCALE), where speech spans about [-2, 2].
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn

from ..vision.autoencoder import VisionOutput
from ..vision.quantizers import EMAQuantizer

MEAN, SCALE = -3.0, 4.0  # log-mel normalisation: silence (log 1e-5 = -11.5) -> -2.1, loud speech (~4) -> 1.75


def _groups(c: int) -> int:
    return math.gcd(c, 8)


class _Residual(nn.Module):
    def __init__(self, c: int):
        super().__init__()
        self.body = nn.Sequential(nn.GroupNorm(_groups(c), c), nn.SiLU(), nn.Conv1d(c, c, 3, padding=1),
                                  nn.GroupNorm(_groups(c), c), nn.SiLU(), nn.Conv1d(c, c, 3, padding=1))

    def forward(self, x):
        return x + self.body(x)


class MelAutoencoder(nn.Module):
    def __init__(self, ac):
        super().__init__()
        self.cfg = ac
        c, m, down = ac.channels, ac.n_mels, int(round(math.log2(ac.stack)))
        self.quantizer = EMAQuantizer(ac.codebook, ac.code_dim, beta=ac.beta, decay=ac.ema_decay, dead=ac.dead_code)
        enc: list[nn.Module] = [nn.Conv1d(m, c, 3, padding=1)]
        for _ in range(down):
            enc += [nn.SiLU(), nn.Conv1d(c, c, 4, stride=2, padding=1)]
        self.encoder = nn.Sequential(*enc, _Residual(c), _Residual(c), nn.GroupNorm(_groups(c), c), nn.SiLU(),
                                     nn.Conv1d(c, ac.code_dim, 1))
        dec: list[nn.Module] = [nn.Conv1d(ac.code_dim, c, 3, padding=1), _Residual(c), _Residual(c)]
        for _ in range(down):
            dec += [nn.GroupNorm(_groups(c), c), nn.SiLU(), nn.ConvTranspose1d(c, c, 4, stride=2, padding=1)]
        self.decoder = nn.Sequential(*dec, nn.SiLU(), nn.Conv1d(c, m, 3, padding=1))

    @property
    def codebook_size(self) -> int:
        return self.quantizer.codebook_size

    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def _quantize(self, z: torch.Tensor):
        b, d, t = z.shape
        out = self.quantizer(z.transpose(1, 2).reshape(-1, d))  # (B*t, D)
        return out.q.reshape(b, t, d).transpose(1, 2), out.codes.reshape(b, t), out

    def _check(self, mel: torch.Tensor) -> torch.Tensor:
        if mel.ndim != 3 or mel.shape[2] != self.cfg.n_mels or mel.shape[1] % self.cfg.stack:
            raise ValueError(f"expected log-mel frames (B, T, {self.cfg.n_mels}) with T a multiple of {self.cfg.stack}, "
                             f"got {tuple(mel.shape)}")
        return ((mel.float() - MEAN) / SCALE).transpose(1, 2)  # (B, M, T)

    def forward(self, idx: torch.Tensor) -> VisionOutput:
        """``idx``: log-mel frames (B, T, M) (the name the training loop passes a batch's "input" by)."""
        x = self._check(idx)
        q, codes, out = self._quantize(self.encoder(x))
        return VisionOutput(self.decoder(q), x, codes, out.loss, out.stats)

    @torch.no_grad()
    def encode(self, mel: torch.Tensor) -> torch.Tensor:
        """(B, T, M) log-mel -> codes (B, T / stack)."""
        return self._quantize(self.encoder(self._check(mel)))[1]

    @torch.no_grad()
    def decode(self, codes: torch.Tensor) -> torch.Tensor:
        """codes (B, t) -> log-mel (B, t * stack, M)."""
        q = self.quantizer.embed(codes).transpose(1, 2)  # (B, D, t)
        return (self.decoder(q) * SCALE + MEAN).transpose(1, 2)
