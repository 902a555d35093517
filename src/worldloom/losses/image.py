"""The image autoencoder's objective: pixel reconstruction plus the quantiser's own loss."""

from __future__ import annotations

import torch.nn.functional as F

from .base import LossOutput


def image_objective(out, batch) -> LossOutput:
    """``out``: a ``worldloom.vision.VisionOutput``. ``loss`` is the reconstruction MSE (pixels in [0, 1]),
    the figure the held-out loss reports; the total adds the commitment loss (VQ; zero for FSQ)."""
    mse = F.mse_loss(out.recon.float(), out.target.float())
    parts = {"loss": mse.item(), "commit": float(out.aux_loss.detach()), **{k: float(v) for k, v in out.stats.items()}}
    return LossOutput(mse + out.aux_loss, parts)
