"""The image autoencoder's objective: pixel reconstruction plus the quantiser's own loss."""

from __future__ import annotations

from .base import LossOutput


def image_objective(out, batch) -> LossOutput:
    """``out``: a ``worldloom.vision.VisionOutput``. ``loss`` is the reconstruction MSE (pixels in [0, 1]),
    the figure the held-out loss reports; the total adds the commitment loss (VQ; zero for FSQ). With per-pixel
    weights (``out.weight``, ``vision.rare_weight``) the total takes the weighted MSE instead (``weighted`` in the
    parts); ``loss`` stays the plain MSE, so that held-out losses compare across weightings."""
    sq = (out.recon.float() - out.target.float()) ** 2
    mse = sq.mean()
    parts = {"loss": mse.item(), "commit": float(out.aux_loss.detach()), **{k: float(v) for k, v in out.stats.items()}}
    rec = mse
    if out.weight is not None:
        rec = (sq * out.weight).mean()
        parts["weighted"] = rec.item()
    return LossOutput(rec + out.aux_loss, parts)
