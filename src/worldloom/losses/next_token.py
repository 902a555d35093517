"""Next-token cross-entropy."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def next_token_loss(logits: torch.Tensor, targets: torch.Tensor, weight: torch.Tensor | None = None) -> torch.Tensor:
    """Mean cross-entropy (nats/token) of logits (B, T, V) against targets (B, T).

    ``weight`` (B, T), if given, scales each position (0 masks it out); the mean is over
    the total weight. Computed in fp32 whatever the logits' dtype.
    """
    B, T, V = logits.shape
    nll = F.cross_entropy(logits.float().view(B * T, V), targets.reshape(B * T), reduction="none")
    if weight is None:
        return nll.mean()
    w = weight.reshape(B * T).to(nll.dtype)
    return (nll * w).sum() / w.sum().clamp(min=1e-8)
