"""The mixture-of-experts auxiliary loss, as returned by the model's forward."""

from __future__ import annotations

from .base import LossOutput


def add_moe_aux(out: LossOutput, aux: dict) -> LossOutput:
    """Add the model's MoE auxiliary loss (``aux["moe_aux"]``, balance + z over every MoE layer) to
    the total, and log ``moe_aux``, ``moe_load_max`` / ``moe_load_min`` (per-expert share of tokens
    averaged over layers; k/E each when balanced) and ``moe_dropped`` (share dropped by capacity).
    A model without MoE layers has no ``moe_aux`` and the output is returned unchanged."""
    if "moe_aux" not in aux:
        return out
    load = aux["moe_load"]
    parts = dict(out.parts, moe_aux=aux["moe_aux"].detach().item(), moe_load_max=load.max().item(),
                 moe_load_min=load.min().item(), moe_dropped=float(aux["moe_dropped"]))
    return LossOutput(out.total + aux["moe_aux"], parts)
