"""What every objective returns."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass
class LossOutput:
    """The total to backpropagate and named parts to log."""

    total: torch.Tensor
    parts: dict[str, float] = field(default_factory=dict)
