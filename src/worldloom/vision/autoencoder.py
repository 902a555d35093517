"""A convolutional image autoencoder with a discrete bottleneck: frames <-> grids of codes.

    pixels (B, H, W, 3) uint8 --encoder--> z (B, D, H/f, W/f) --quantiser--> codes (B, H/f, W/f)
    codes --embed--> q (B, D, H/f, W/f) --decoder--> pixels (B, H, W, 3)

The encoder is ``log2(f)`` stride-2 convolutions, two residual blocks at the code resolution
and a 1x1 projection to the code size; the decoder mirrors it (residual blocks, then
transposed convolutions) and ends in a sigmoid (pixels in [0, 1]). The work sits at the
low resolutions: no residual block runs at full size, which keeps a CPU step short. With MiniGrid's agent view rendered at
8 pixels per cell (56 x 56) and f = 8, each code covers exactly one cell.

``forward(pixels)`` returns a ``VisionOutput`` for the training objective
(``worldloom.losses.image_objective``); ``encode`` / ``decode`` are the tokenizer's two ways.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn as nn

from .quantizers import EMAQuantizer, FSQuantizer


@dataclass
class VisionOutput:
    recon: torch.Tensor  # (B, 3, H, W) in [0, 1]
    target: torch.Tensor  # (B, 3, H, W) in [0, 1]
    codes: torch.Tensor  # (B, h, w) int64
    aux_loss: torch.Tensor  # the quantiser's (commitment) loss
    stats: dict
    weight: torch.Tensor | None = None  # (B, 1, H, W) per-pixel weights of the reconstruction loss (None: plain MSE)


def colour_weights(pixels: torch.Tensor, power: float) -> torch.Tensor:
    """(B, H, W, 3) uint8 -> (B, 1, H, W) weights: each pixel's ``count ** -power``, where count is how many
    pixels of the batch have exactly its colour, scaled to mean 1. In a MiniGrid view floor and walls are ~90%
    of the pixels; the objects, a few pixels each in rarer colours, are what a cell reader needs right."""
    p = pixels.long()
    key = (p[..., 0] * 256 + p[..., 1]) * 256 + p[..., 2]
    _, inverse, counts = torch.unique(key.reshape(-1), return_inverse=True, return_counts=True)
    w = counts.float().pow(-power)[inverse]
    return (w / w.mean()).reshape(key.shape).unsqueeze(1)


def _groups(c: int) -> int:
    return math.gcd(c, 8)


class _Residual(nn.Module):
    def __init__(self, c: int):
        super().__init__()
        self.body = nn.Sequential(nn.GroupNorm(_groups(c), c), nn.SiLU(), nn.Conv2d(c, c, 3, padding=1),
                                  nn.GroupNorm(_groups(c), c), nn.SiLU(), nn.Conv2d(c, c, 3, padding=1))

    def forward(self, x):
        return x + self.body(x)


def make_quantizer(vc) -> nn.Module:
    """The bottleneck a ``VisionConfig`` names (``vision.quantizer``)."""
    if vc.quantizer == "fsq":
        return FSQuantizer(vc.levels())
    return EMAQuantizer(vc.codebook, vc.code_dim, beta=vc.beta, decay=vc.ema_decay, dead=vc.dead_code)


class ImageAutoencoder(nn.Module):
    def __init__(self, vc):
        super().__init__()
        self.cfg = vc
        c, down = vc.channels, int(round(math.log2(vc.downsample)))
        self.quantizer = make_quantizer(vc)
        dim = self.quantizer.dim
        enc = [nn.Conv2d(3, c, 3, padding=1)] if down == 0 else [nn.Conv2d(3, c, 4, stride=2, padding=1)]
        for _ in range(down - 1):
            enc += [nn.SiLU(), nn.Conv2d(c, c, 4, stride=2, padding=1)]
        self.encoder = nn.Sequential(*enc, _Residual(c), _Residual(c), nn.GroupNorm(_groups(c), c), nn.SiLU(),
                                     nn.Conv2d(c, dim, 1))
        dec = [nn.Conv2d(dim, c, 3, padding=1), _Residual(c), _Residual(c)]
        for _ in range(down):
            dec += [nn.GroupNorm(_groups(c), c), nn.SiLU(), nn.ConvTranspose2d(c, c, 4, stride=2, padding=1)]
        self.decoder = nn.Sequential(*dec, nn.SiLU(), nn.Conv2d(c, 3, 3, padding=1))

    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())

    @property
    def codebook_size(self) -> int:
        return self.quantizer.codebook_size

    @staticmethod
    def to_float(pixels: torch.Tensor) -> torch.Tensor:
        """(B, H, W, 3) uint8 -> (B, 3, H, W) float in [0, 1]."""
        return pixels.permute(0, 3, 1, 2).float() / 255.0

    def _quantize(self, z: torch.Tensor):
        b, d, h, w = z.shape
        out = self.quantizer(z.permute(0, 2, 3, 1).reshape(-1, d))  # (B*h*w, D)
        q = out.q.reshape(b, h, w, d).permute(0, 3, 1, 2)
        return q, out.codes.reshape(b, h, w), out

    def forward(self, idx: torch.Tensor) -> VisionOutput:
        """``idx``: frames (B, H, W, 3) uint8 (the name the training loop passes a batch's "input" by)."""
        x = self.to_float(idx)
        q, codes, out = self._quantize(self.encoder(x))
        recon = torch.sigmoid(self.decoder(q))
        power = self.cfg.rare_weight
        weight = colour_weights(idx, power) if self.training and power > 0 else None
        return VisionOutput(recon, x, codes, out.loss, out.stats, weight)

    @torch.no_grad()
    def encode(self, pixels: torch.Tensor) -> torch.Tensor:
        """(B, H, W, 3) uint8 -> codes (B, h, w)."""
        return self._quantize(self.encoder(self.to_float(pixels)))[1]

    @torch.no_grad()
    def decode(self, codes: torch.Tensor) -> torch.Tensor:
        """codes (B, h, w) -> (B, H, W, 3) uint8."""
        q = self.quantizer.embed(codes).permute(0, 3, 1, 2)  # (B, D, h, w)
        x = torch.sigmoid(self.decoder(q))
        return (x * 255.0).round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1)
