"""Generalised advantage estimation (Schulman et al. 2016) over time-major rollouts.

``gae(rewards, values, dones, last_value, gamma, lam)`` takes (T, N) tensors: N parallel
environments, T steps each, ``dones[t, n]`` = the episode of env n ended at step t (its next
step, if any, starts a new episode). With δ_t = r_t + γ·V(s_{t+1})·(1 − done_t) − V(s_t),

    A_t = δ_t + γλ·(1 − done_t)·A_{t+1},        returns R_t = A_t + V(s_t),

where V(s_T) = ``last_value`` (N,) bootstraps the episodes still running at the end of the rollout.

Truncation vs termination: an episode that ``dones`` marks as ended is treated as *terminated*
(nothing after it is counted). A caller whose episode was cut by a time limit, and who wants
to bootstrap from the state it was cut at, adds γ·V(s_cut) to that step's reward before calling
(the usual correction). The world runs' RL does so for episodes cut at ``rl.horizon``
(worldloom.world.rl.score) and treats a level's own time limit as the end of the task (its
reward is then 0: the level was failed), as BabyAI's own PPO does.
"""

from __future__ import annotations

import torch


def gae(rewards: torch.Tensor, values: torch.Tensor, dones: torch.Tensor, last_value: torch.Tensor,
        gamma: float, lam: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(T, N) rewards, values, dones and (N,) last_value -> (advantages, returns), both (T, N)."""
    if not (rewards.shape == values.shape == dones.shape) or rewards.dim() != 2:
        raise ValueError(f"rewards, values and dones must share one (T, N) shape; got {tuple(rewards.shape)}, "
                         f"{tuple(values.shape)}, {tuple(dones.shape)}")
    if last_value.shape != rewards.shape[1:]:
        raise ValueError(f"last_value must be (N,) = {tuple(rewards.shape[1:])}, got {tuple(last_value.shape)}")
    rewards, values = rewards.float(), values.float()
    cont = 1.0 - dones.float()  # 0 where the episode ended at step t
    adv = torch.zeros_like(rewards)
    running = torch.zeros_like(last_value, dtype=torch.float32)
    next_value = last_value.float()
    for t in range(rewards.shape[0] - 1, -1, -1):
        delta = rewards[t] + gamma * next_value * cont[t] - values[t]
        running = delta + gamma * lam * cont[t] * running
        adv[t] = running
        next_value = values[t]
    return adv, adv + values
