"""World-stream parts: the cross-entropy of each modality (for the log) and the frame head's loss."""

from __future__ import annotations

import torch
import torch.nn.functional as F


@torch.no_grad()
def modality_parts(logits: torch.Tensor, target: torch.Tensor, masks: dict[str, torch.Tensor]) -> dict[str, float]:
    """Unweighted cross-entropy over the positions of each mask (B, T): {"loss_<name>": nats}; empty masks skipped."""
    if not masks:
        return {}
    nll = F.cross_entropy(logits.detach().float().flatten(0, 1), target.flatten(), reduction="none")  # (B*T,)
    out = {}
    for name, mask in masks.items():
        m = mask.flatten()
        if m.any():
            out["loss_" + name] = nll[m].mean().item()
    return out


def frame_loss(frame_logits: torch.Tensor, frame_target: torch.Tensor) -> torch.Tensor:
    """Cross-entropy of the frame head's logits (N, F, V) against the next observations' tokens (N, F)."""
    return F.cross_entropy(frame_logits.float().flatten(0, 1), frame_target.flatten())
