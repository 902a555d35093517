"""The contrastive objective: symmetric InfoNCE over the trained pairs of modalities.

For a batch of N items and a pair (A, B) with unit embeddings a_i, b_j and logit scale s:

    S_ij = s * <a_i, b_j>                                  (N, N): item i's A against item j's B
    L_AB = 1/2 * ( CE(rows of S, diagonal) + CE(columns of S, diagonal) )

each item's own partner is the right answer among the batch, both ways (CLIP, ImageBind). The
objective averages L over the pairs named in ``bind.pairs`` (text is the hub: view-text and
actions-text); the pair never trained is only measured (``worldloom.bind.retrieval``).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..losses import LossOutput


def info_nce(a: torch.Tensor, b: torch.Tensor, scale: torch.Tensor | float) -> torch.Tensor:
    """Symmetric InfoNCE of unit embeddings a, b (N, D) whose i-th rows belong together."""
    logits = scale * a.float() @ b.float().T  # (N, N)
    target = torch.arange(len(a), device=a.device)
    return 0.5 * (F.cross_entropy(logits, target) + F.cross_entropy(logits.T, target))


def bind_objective(pairs: tuple[tuple[str, str], ...]):
    """The loss function for the loop: (BindOutput, batch) -> LossOutput, mean InfoNCE over ``pairs``."""

    def objective(out, batch) -> LossOutput:
        losses = {f"{a}-{b}": info_nce(out.embeddings[a], out.embeddings[b], out.scale) for a, b in pairs}
        total = torch.stack(list(losses.values())).mean()
        parts = {"loss": total.item(), "temperature": 1.0 / float(out.scale.detach()),
                 **{f"loss_{k}": v.item() for k, v in losses.items()}}
        return LossOutput(total, parts)

    return objective
