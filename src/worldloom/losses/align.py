"""Sequence-level objectives of alignment: DPO, IPO, ORPO and a Bradley–Terry reward model.

Each is a small pure function of per-sequence log-probabilities (or rewards), so that it can be
checked on hand-worked numbers. For a pair (chosen y_w, rejected y_l) of responses to one
prompt x, with log π(y|x) the sum of the response tokens' log-probabilities:

    DPO  (Rafailov et al. 2023)   L = -log σ(β [(log π(y_w) - log π_ref(y_w)) - (log π(y_l) - log π_ref(y_l))])
    IPO  (Azar et al. 2023)       L = (h - 1/(2β))²,  h the same difference of log-ratios, with
                                  per-token mean log-probabilities (as TRL does), so β keeps its scale
    ORPO (Hong et al. 2024)       L = L_SFT(y_w) + λ · -log σ(log odds(y_w) - log odds(y_l)),
                                  odds(y) = P/(1-P), P = exp(mean per-token log-probability); no reference
    Bradley–Terry reward model    L = -log σ(r(x, y_w) - r(x, y_l))

Everything is computed in fp32 with log-sigmoid and log(1 - e^x) in their stable forms, so that
extreme log-probabilities (a response the model finds near-certain or near-impossible) give
finite losses and gradients.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from .base import LossOutput


def sequence_logprobs(logits: torch.Tensor, targets: torch.Tensor, weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits (B, T, V), targets (B, T), weight (B, T) (1 on response tokens) -> (sum of the weighted
    tokens' log-probabilities (B,), their count (B,))."""
    logp = torch.log_softmax(logits.float(), dim=-1).gather(-1, targets.unsqueeze(-1)).squeeze(-1)  # (B, T)
    w = weight.float()
    return (logp * w).sum(-1), w.sum(-1)


def dpo_loss(policy_chosen: torch.Tensor, policy_rejected: torch.Tensor, ref_chosen: torch.Tensor,
             ref_rejected: torch.Tensor, beta: float, kind: str = "sigmoid") -> LossOutput:
    """DPO (kind=sigmoid) or IPO (kind=ipo) of B pairs; every argument (B,) log-probabilities
    (sums for DPO, per-token means for IPO). Parts: the loss, the implicit rewards β·log-ratio of
    chosen and rejected, their margin and how often chosen wins (reward accuracy)."""
    chosen = policy_chosen.float() - ref_chosen.float()  # log π/π_ref of y_w
    rejected = policy_rejected.float() - ref_rejected.float()
    h = chosen - rejected
    if kind == "sigmoid":
        losses = -F.logsigmoid(beta * h)
    elif kind == "ipo":
        losses = (h - 1.0 / (2.0 * beta)) ** 2
    else:
        raise ValueError(f"unknown DPO loss {kind!r} (sigmoid or ipo)")
    loss = losses.mean()
    with torch.no_grad():
        r_w, r_l = beta * chosen, beta * rejected
        parts = {"loss": float(loss), "reward_chosen": float(r_w.mean()), "reward_rejected": float(r_l.mean()),
                 "margin": float((r_w - r_l).mean()), "reward_acc": float((r_w > r_l).float().mean())}
    return LossOutput(loss, parts)


def log1mexp(x: torch.Tensor) -> torch.Tensor:
    """log(1 - e^x) for x < 0, stable at both ends (Mächler 2012); x is clamped just below 0."""
    x = x.clamp(max=-1e-7)
    return torch.where(x > -math.log(2.0), torch.log(-torch.expm1(x)), torch.log1p(-torch.exp(x)))


def orpo_loss(nll_chosen: torch.Tensor, mean_logp_chosen: torch.Tensor, mean_logp_rejected: torch.Tensor,
              lam: float) -> LossOutput:
    """ORPO of B pairs: ``nll_chosen`` the SFT loss (mean cross-entropy of the chosen responses' tokens),
    ``mean_logp_*`` (B,) per-token mean log-probabilities of chosen and rejected responses."""
    lw, ll = mean_logp_chosen.float(), mean_logp_rejected.float()
    log_odds = (lw - log1mexp(lw)) - (ll - log1mexp(ll))
    ratio = -F.logsigmoid(log_odds).mean()
    total = nll_chosen + lam * ratio
    with torch.no_grad():
        parts = {"loss": float(nll_chosen), "odds_ratio": float(ratio), "log_odds": float(log_odds.mean()),
                 "reward_acc": float((log_odds > 0).float().mean())}
    return LossOutput(total, parts)


def bradley_terry_loss(reward_chosen: torch.Tensor, reward_rejected: torch.Tensor) -> LossOutput:
    """-log σ(r_w - r_l) over B pairs of scalar rewards (B,); parts: loss, accuracy, mean margin."""
    d = reward_chosen.float() - reward_rejected.float()
    loss = -F.logsigmoid(d).mean()
    with torch.no_grad():
        parts = {"loss": float(loss), "reward_acc": float((d > 0).float().mean()), "margin": float(d.mean())}
    return LossOutput(loss, parts)
