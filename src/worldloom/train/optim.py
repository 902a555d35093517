"""AdamW with decay only on matrices, and a warmup + cosine learning-rate schedule."""

from __future__ import annotations

import math

import torch
from torch import nn


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Weight decay on weight matrices; none on norms, biases, embeddings (tied or not) and
    parameters tagged ``_no_weight_decay`` (Mamba's A_log and D)."""
    embedding_ids = {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)}
    decay, no_decay = [], []
    for p in model.parameters():  # shared (tied) parameters are listed once
        if not p.requires_grad:
            continue
        wants = p.ndim >= 2 and id(p) not in embedding_ids and not getattr(p, "_no_weight_decay", False)
        (decay if wants else no_decay).append(p)
    return [
        {"params": decay, "weight_decay": weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]


def make_optimizer(model: nn.Module, tc) -> torch.optim.AdamW:
    return torch.optim.AdamW(param_groups(model, tc.weight_decay), lr=tc.lr, betas=(tc.beta1, tc.beta2))


def lr_at(step: int, progress: float, tc) -> float:
    """Linear warmup over `warmup_steps`, then cosine from lr to min_lr as progress goes 0 -> 1.

    `progress` is the fraction of the run's budget used: max(step / max_steps, elapsed /
    max_minutes), so a wall-clock budget ends with a fully decayed learning rate too.
    """
    warm = min(1.0, (step + 1) / tc.warmup_steps) if tc.warmup_steps > 0 else 1.0
    p = min(max(progress, 0.0), 1.0)
    return warm * (tc.min_lr + 0.5 * (1.0 + math.cos(math.pi * p)) * (tc.lr - tc.min_lr))
