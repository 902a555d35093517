"""The objectives the recipes train on: ``objective(model_output, batch) -> LossOutput``."""

from __future__ import annotations

from .base import LossOutput
from .moe import add_moe_aux
from .next_token import next_token_loss
from .world import frame_loss, modality_parts


def language_model_loss(out, batch: dict) -> LossOutput:
    """Next-token cross-entropy (weighted by ``batch["weight"]`` if present) + MoE auxiliary loss."""
    loss = next_token_loss(out.logits, batch["target"], batch.get("weight"))
    return add_moe_aux(LossOutput(loss, {"loss": loss.detach().item()}), out.aux)


def world_stream_loss(out, batch: dict) -> LossOutput:
    """A world stream: the weighted next-token cross-entropy, ``loss_<kind>`` for each ``part_<kind>``
    mask in the batch (obs, action, ...), plus the frame head's loss times ``batch["frame_weight"]``
    when the model produced frame logits, plus the MoE auxiliary loss."""
    loss = next_token_loss(out.logits, batch["target"], batch.get("weight"))
    masks = {k[5:]: v for k, v in batch.items() if k.startswith("part_")}
    parts = {"loss": loss.detach().item(), **modality_parts(out.logits, batch["target"], masks)}
    total = loss
    if out.frame_logits is not None:
        frame = frame_loss(out.frame_logits, batch["frame_target"])
        parts["loss_frame"] = frame.detach().item()
        total = total + batch.get("frame_weight", 1.0) * frame
    return add_moe_aux(LossOutput(total, parts), out.aux)
