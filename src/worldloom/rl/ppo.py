"""The clipped PPO objective (Schulman et al. 2017), a value head, and the exact KL to a frozen
reference over a small action vocabulary.

Everything here works on flat tensors of samples (one entry per action taken): the caller
gathers the log-probabilities, values and entropies at the positions where its policy acted.
The total loss is

    L = L_clip + vf_coef·L_value − ent_coef·H + kl_coef·KL(π ‖ π_ref)

    L_clip  = −mean(min(ρ·A, clip(ρ, 1−ε, 1+ε)·A)),      ρ = exp(log π − log π_old)
    L_value = ½·mean(max((V − R)², (V_clip − R)²)),       V_clip = V_old + clip(V − V_old, ±value_clip)

(plain ½·mean((V − R)²) with value_clip = 0). During the first ``value_warmup`` updates a
caller trains the value head only (``value_only=True``): a fresh critic's noisy advantages
would otherwise pull the behaviour-cloned policy away before the critic knows anything.
``approx_kl`` = mean((ρ − 1) − log ρ) (Schulman's k3 estimator of KL(π_old ‖ π)) drives the
``target_kl`` early stop; ``clipfrac`` is the share of samples whose ratio left [1−ε, 1+ε].
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..backbones.transformer import RMSNorm
from ..errors import ConfigError
from ..losses.base import LossOutput


@dataclass
class PPOConfig:
    clip: float = 0.2  # ε of the clipped ratio
    value_clip: float = 0.2  # 0 = an unclipped value loss
    vf_coef: float = 0.5
    ent_coef: float = 0.01
    kl_coef: float = 0.05  # KL(π ‖ π_ref) to the frozen reference (the starting model)
    gamma: float = 0.99
    lam: float = 0.95
    epochs: int = 4  # passes over each update's samples
    minibatch: int = 256  # samples per gradient step
    lr: float = 1e-4
    grad_clip: float = 1.0  # 0 = off
    value_warmup: int = 2  # first updates that train the value head only
    target_kl: float = 0.03  # stop an update's epochs once approx_kl exceeds it (0 = never)
    norm_adv: bool = True  # advantages normalised to mean 0, std 1 per minibatch
    value_backbone: bool = False  # let the value loss train the shared network too (else the head only)

    def __post_init__(self):
        for name in ("clip", "value_clip", "vf_coef", "ent_coef", "kl_coef", "grad_clip", "target_kl"):
            if getattr(self, name) < 0:
                raise ConfigError(f"rl.{name} must be >= 0, got {getattr(self, name)}")
        for name in ("gamma", "lam"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ConfigError(f"rl.{name} must be in [0, 1], got {getattr(self, name)}")
        for name in ("epochs", "minibatch"):
            if getattr(self, name) < 1:
                raise ConfigError(f"rl.{name} must be >= 1, got {getattr(self, name)}")
        if self.lr <= 0:
            raise ConfigError(f"rl.lr must be positive, got {self.lr}")
        if self.value_warmup < 0:
            raise ConfigError(f"rl.value_warmup must be >= 0, got {self.value_warmup}")


class ValueHead(nn.Module):
    """hidden (..., C) -> value (...): RMSNorm, a SiLU MLP, a last layer started at zero (V = 0 at first)."""

    def __init__(self, d_model: int, hidden: int | None = None):
        super().__init__()
        hidden = hidden or d_model
        self.norm = RMSNorm(d_model)
        self.up = nn.Linear(d_model, hidden)
        self.out = nn.Linear(hidden, 1)
        nn.init.zeros_(self.out.weight)
        nn.init.zeros_(self.out.bias)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return self.out(F.silu(self.up(self.norm(h.float())))).squeeze(-1)


def categorical_terms(logits: torch.Tensor, ref_logits: torch.Tensor, actions: torch.Tensor):
    """Logits (M, A) of the allowed actions, the reference's (M, A), the actions taken (M,) ->
    (log π(a), entropy H(π), exact KL(π ‖ π_ref)), each (M,)."""
    logp = F.log_softmax(logits.float(), dim=-1)
    ref = F.log_softmax(ref_logits.float(), dim=-1)
    p = logp.exp()
    taken = logp.gather(-1, actions.long().unsqueeze(-1)).squeeze(-1)
    entropy = -(p * logp).sum(-1)
    kl = (p * (logp - ref)).sum(-1)
    return taken, entropy, kl


def ppo_loss(new_logp: torch.Tensor, old_logp: torch.Tensor, advantages: torch.Tensor, new_values: torch.Tensor,
             old_values: torch.Tensor, returns: torch.Tensor, entropy: torch.Tensor, kl_ref: torch.Tensor,
             cfg: PPOConfig, value_only: bool = False) -> LossOutput:
    """The PPO loss of a minibatch of M samples (every argument (M,)); see the module docs."""
    old_logp, old_values, returns = old_logp.detach(), old_values.detach(), returns.detach()
    adv = advantages.detach().float()
    if cfg.norm_adv and adv.numel() > 1:
        adv = (adv - adv.mean()) / (adv.std() + 1e-8)
    log_ratio = new_logp - old_logp
    ratio = log_ratio.exp()
    policy = -torch.min(ratio * adv, ratio.clamp(1 - cfg.clip, 1 + cfg.clip) * adv).mean()
    err = (new_values - returns) ** 2
    if cfg.value_clip > 0:
        clipped = old_values + (new_values - old_values).clamp(-cfg.value_clip, cfg.value_clip)
        err = torch.max(err, (clipped - returns) ** 2)
    value = 0.5 * err.mean()
    ent, kl = entropy.mean(), kl_ref.mean()
    if value_only:
        total = cfg.vf_coef * value
    else:
        total = policy + cfg.vf_coef * value - cfg.ent_coef * ent + cfg.kl_coef * kl
    with torch.no_grad():
        clipfrac = ((ratio - 1).abs() > cfg.clip).float().mean()
        approx_kl = ((ratio - 1) - log_ratio).mean()
    named = {"policy": policy, "value": value, "entropy": ent, "kl": kl, "clipfrac": clipfrac, "approx_kl": approx_kl}
    parts = {k: float(v.detach()) for k, v in named.items()}
    return LossOutput(total, parts)
