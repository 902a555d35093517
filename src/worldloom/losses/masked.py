"""The fill-mask objectives of the seed chapter: the masked loss, and l_alpha = l + alpha * l_masked.

``masked_lm_loss`` scores a bidirectional pass over windows whose masked positions hold
``<mask>``: the cross-entropy of the original token at those positions only (mean nats per
masked token). ``combined_loss`` adds it, times alpha, to the next-token cross-entropy of a
causal pass over the same windows. The batch (``worldloom.data.masking.masked_batch``) brings
both passes as rows of one model call: the first B rows causal, the last B masked; the masked
rows are always the last ``mask.shape[0]`` ones. Nothing here draws a random number.
"""

from __future__ import annotations

from functools import partial

import torch
import torch.nn.functional as F

from .base import LossOutput
from .moe import add_moe_aux
from .next_token import next_token_loss
from .objectives import language_model_loss


def masked_token_loss(logits: torch.Tensor, target: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy (fp32) of logits (B, T, V) against target (B, T) at the True positions of mask (B, T)."""
    return F.cross_entropy(logits[mask].float(), target[mask])  # (N, V) against (N,): N masked positions


def masked_lm_loss(out, batch: dict) -> LossOutput:
    """Masked-only: ``loss_masked`` (the training figure and, for such runs, the held-out one) + MoE auxiliary loss."""
    B = batch["mask"].shape[0]
    loss = masked_token_loss(out.logits[-B:], batch["mask_target"], batch["mask"])
    return add_moe_aux(LossOutput(loss, {"loss_masked": loss.detach().item()}), out.aux)


def combined_loss(out, batch: dict, alpha: float = 1.0) -> LossOutput:
    """l + alpha * l_masked: ``loss`` (next-token, first B rows, comparable to held-out loss) and ``loss_masked`` (last B rows)."""
    B = batch["target"].shape[0]
    nxt = next_token_loss(out.logits[:B], batch["target"], batch.get("weight"))
    msk = masked_token_loss(out.logits[B:], batch["mask_target"], batch["mask"])
    parts = {"loss": nxt.detach().item(), "loss_masked": msk.detach().item()}
    return add_moe_aux(LossOutput(nxt + alpha * msk, parts), out.aux)


def text_objective(name: str, alpha: float = 1.0):
    """The objective function of ``train.objective`` (next | masked | combined) for a text task."""
    table = {"next": language_model_loss, "masked": masked_lm_loss, "combined": partial(combined_loss, alpha=alpha)}
    if name not in table:
        raise ValueError(f"unknown objective {name!r}; choose from {', '.join(table)}")
    return table[name]
