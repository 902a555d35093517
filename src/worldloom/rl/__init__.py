"""Reinforcement learning over token streams: GAE and a clipped PPO objective, as pure functions
of tensors (no environment, no stream layout). ``worldloom.world.rl`` fine-tunes a world run's
policy in the real environment with them; an RLHF loop ("write a completion, get a reward") can
use the same pieces."""

from .gae import gae
from .ppo import PPOConfig, ValueHead, categorical_terms, ppo_loss

__all__ = ["gae", "PPOConfig", "ValueHead", "categorical_terms", "ppo_loss"]
