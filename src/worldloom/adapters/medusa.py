"""Medusa heads (Cai et al. 2024, Medusa-1): K extra heads that guess tokens further ahead.

The model's own head predicts token t+1 from the last hidden state at t; Medusa head k
(k = 0 .. K-1) predicts token t+k+2 from the same state. Each head is one residual SiLU block,
``x + silu(W x + b)`` with W and b zero at the start (so a new head is the identity and predicts
what the model's head predicts), on the model's final-normed hidden state, followed by the
model's own output head (frozen and shared: a head costs one d_model x d_model matrix).

    attach_heads(model, 4)                       # model.medusa: the K blocks (parameters medusa.*)
    logits = head_logits(model, out.hidden)      # (K, ..., V)
    loss = medusa_loss(logits, target, weight)   # mean over heads of each head's cross-entropy

A Medusa run (`worldloom tune medusa RUN heads=K`, recipe ``medusa``) is a tuned run whose
checkpoints hold the heads only; ``prepare_medusa`` builds its model: the base run's weights
(hash-checked, `tune.base.prepare_tuned`), frozen, with the heads attached. Decoding with them:
`worldloom.inference.medusa`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import ConfigError, WorldloomError
from ..losses import LossOutput

MAX_HEADS = 16


class NoHeadsError(WorldloomError):
    """Medusa decoding asked of a model without heads."""


class ResBlock(nn.Module):
    """x + silu(linear(x)), the identity at the start (zero weight and bias)."""

    def __init__(self, d: int):
        super().__init__()
        self.linear = nn.Linear(d, d)
        nn.init.zeros_(self.linear.weight)
        nn.init.zeros_(self.linear.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + F.silu(self.linear(x))


class MedusaHeads(nn.Module):
    """K residual blocks over the model's normed hidden state; their outputs go through the model's head."""

    def __init__(self, d_model: int, heads: int):
        super().__init__()
        check_heads(heads)
        self.blocks = nn.ModuleList(ResBlock(d_model) for _ in range(heads))

    def __len__(self) -> int:
        return len(self.blocks)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x (..., C) -> (K, ..., C)."""
        return torch.stack([b(x) for b in self.blocks])


def check_heads(heads) -> None:
    if isinstance(heads, bool) or not isinstance(heads, int) or not 1 <= heads <= MAX_HEADS:
        raise ConfigError(f"medusa heads must be a whole number from 1 to {MAX_HEADS}, got {heads!r}")


def attach_heads(model: nn.Module, heads: int) -> MedusaHeads:
    """Give ``model`` K new Medusa heads (``model.medusa``), on the model's device."""
    model.medusa = MedusaHeads(model.cfg.d_model, heads).to(next(model.parameters()).device)
    return model.medusa


def heads_of(model: nn.Module) -> MedusaHeads:
    """The model's Medusa heads, or a one-line error saying how to get some."""
    heads = getattr(model, "medusa", None)
    if not isinstance(heads, MedusaHeads):
        raise NoHeadsError("this run has no Medusa heads; train some with `worldloom tune medusa RUN heads=4 name=NAME` "
                           "and decode with that run")
    return heads


def head_logits(model: nn.Module, hidden: torch.Tensor) -> torch.Tensor:
    """Hidden states (..., C) (``ModelOutput.hidden``) -> the heads' logits (K, ..., V); head k guesses
    the token k+2 positions after each state's own."""
    return model.head(heads_of(model)(model.norm(hidden)))


def medusa_loss(logits: torch.Tensor, target: torch.Tensor, weight: torch.Tensor) -> LossOutput:
    """Mean over heads of each head's weighted cross-entropy. logits (K, B, T, V); target, weight (B, T):
    the next token at each position and whether it counts; head k at position t is scored against
    target[t+k+1] with weight[t+k+1]. Parts: ``loss`` (the mean), ``ce{k}`` and top-1 ``acc{k}`` per head
    (k from 1: the head predicting k+1 tokens ahead of the model's)."""
    K, B, T, _ = logits.shape
    ces, parts = [], {}
    for k in range(min(K, T - 1)):
        lg, tg, w = logits[k, :, : T - k - 1], target[:, k + 1 :], weight[:, k + 1 :]  # (B, T-k-1, V), (B, T-k-1)
        n = w.sum().clamp(min=1e-9)
        ce = (F.cross_entropy(lg.float().flatten(0, 1), tg.flatten(), reduction="none") * w.flatten()).sum() / n
        ces.append(ce)
        parts[f"ce{k + 1}"] = float(ce.detach())
        parts[f"acc{k + 1}"] = float(((lg.argmax(-1) == tg).float() * w).sum() / n)
    total = torch.stack(ces).mean()
    return LossOutput(total, {"loss": float(total.detach()), **parts})


def prepare_medusa(model: nn.Module, cfg, run_dir=None) -> MedusaHeads:
    """A Medusa run's model: the base run's weights (hash-checked), every one frozen, then new trainable heads."""
    from ..tune.base import prepare_tuned

    if cfg.lora.rank:
        raise ConfigError("a Medusa run trains heads over a frozen base; drop lora.rank (tune LoRA first, then Medusa)")
    prepare_tuned(model, cfg, run_dir)
    model.requires_grad_(False)
    return attach_heads(model, cfg.medusa.heads)
