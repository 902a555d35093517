"""Episodes played inside the learned world: the policy acts, the world model answers.

`imagine_episodes` is `run_episodes(record=True)` (worldloom.world.rollout.agent) with the
environment replaced by the model itself, as IRIS and DreamerV3 learn "in imagination". For
every seed the REAL environment is reset once, for the first observation, the mission and the
step limit (`real_starts`); nothing else is asked of it. From there `BatchedWorldModelEnv`
(worldloom.world.rollout.imagine) carries ``envs`` episodes at once: the model's policy picks
an action (sampled at temperature 1 from its logits over the action ids), then the same model
predicts the reward token (decoded from its reward bins), the end token and the next
observation, fed back as the stream's truth. An episode ends where the model imagines an end,
or is truncated at the real environment's step limit for its level.

The episodes come back as `EpisodeResult`s holding `Episode`s, exactly what the real collector
returns, so the PPO update (worldloom.world.rl) scores them the same way. ``success`` and
``ret`` are the IMAGINED outcome (the model's own rewards); only a run in the real environment
(`worldloom eval`) says whether the policy really succeeds.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from ...inference.sampling import sample
from ..data.episodes import Episode
from ..envs import make_adapter
from ..stream import StreamLayout
from .agent import EpisodeResult
from .imagine import BatchedWorldModelEnv, available_modes


@dataclass
class RealStart:
    """What one real reset gives an imagined episode."""

    seed: int
    mission: str
    fields: dict  # the first observation as the adapter stores it (no batch axis)
    max_steps: int  # the real environment's step limit for this level


def _cap(limit: int, horizon: int) -> int:
    return min(limit, horizon) if horizon > 0 else limit


def real_starts(env_id: str, seeds: list[int], horizon: int = 0) -> list[RealStart]:
    """One real reset per seed (the only real environment calls imagination makes); ``horizon`` > 0 caps
    each episode's step limit (IRIS-style short imagined rollouts in long games such as Crafter)."""
    adapter = make_adapter(env_id)
    env = adapter.make()
    try:
        out = []
        for s in seeds:
            raw, _ = env.reset(seed=int(s))
            out.append(RealStart(int(s), adapter.mission(raw), adapter.observe(raw), _cap(int(adapter.max_steps(env)), horizon)))
        return out
    finally:
        env.close()


class _Tape:
    """One imagined episode being written down."""

    def __init__(self, start: RealStart, first: dict):
        self.start, self.frames = start, [first]
        self.actions, self.rewards = [], []
        self.terminated = self.truncated = False

    def add(self, action: int, reward: float, fields: dict, terminated: bool, truncated: bool) -> None:
        self.actions.append(action)
        self.rewards.append(reward)
        self.frames.append(fields)
        self.terminated, self.truncated = bool(terminated), bool(truncated)

    def result(self) -> EpisodeResult:
        T = len(self.actions)
        ep = Episode(seed=self.start.seed, mission=self.start.mission,
                     obs={k: np.stack([f[k] for f in self.frames]) for k in self.frames[0]},
                     action=np.array(self.actions, np.int64), reward=np.array(self.rewards, np.float32),
                     terminated=self.terminated, truncated=self.truncated, random_action=np.zeros(T, bool))
        ret = float(ep.reward.sum())
        return EpisodeResult(self.start.seed, ret > 0, ret, T, ep)


def _imagine_wave(sim: BatchedWorldModelEnv, layout: StreamLayout, starts: list[RealStart]) -> list[EpisodeResult]:
    """Imagine one episode per start, all in lockstep, until every one has ended."""
    first = sim.reset([s.mission for s in starts], {k: np.stack([s.fields[k] for s in starts]) for k in starts[0].fields})
    tapes = [_Tape(s, {k: v[i] for k, v in first.items()}) for i, s in enumerate(starts)]
    limits = np.array([s.max_steps for s in starts], np.int64)
    ended = np.zeros(len(starts), bool)
    rows = np.arange(len(starts))  # the tape of each stream still in the simulator
    while True:
        logits = sim.policy_logits()
        actions = layout.decode_action(sample(logits, 1.0, generator=sim.generator).cpu().numpy())
        obs, reward, term, trunc = sim.step(actions)
        trunc = (trunc | (sim.t >= limits[rows])) & ~term  # the real level's step limit
        for j, w in enumerate(rows):
            if not ended[w]:
                tapes[w].add(int(actions[j]), float(reward[j]), {k: v[j] for k, v in obs.items()}, term[j], trunc[j])
                ended[w] = term[j] or trunc[j]
        still = ~ended[rows]
        if not still.any():
            return [t.result() for t in tapes]
        if still.sum() <= 0.75 * len(rows):  # drop ended streams (one re-prefill) once enough have ended
            keep = np.flatnonzero(still)
            sim.keep(keep)
            rows = rows[keep]


@torch.no_grad()
def imagine_episodes(model, layout: StreamLayout, starts: list[RealStart], envs: int = 64, seed: int = 0,
                     mode: str = "", greedy_world: bool = False, temperature: float | None = None) -> list[EpisodeResult]:
    """One imagined episode per real start, ``envs`` at a time. ``mode``: how the world model imagines
    (`BatchedWorldModelEnv`'s tokens / parallel / fast; "" = the best the model can); ``greedy_world``:
    the world model's tokens by argmax instead of sampled; ``temperature`` (overrides it): the world model's
    sampling temperature (0: argmax). Actions are always sampled (the PPO policy).
    Everything random is drawn from one generator seeded by ``seed``."""
    if envs < 1:
        raise ValueError(f"envs must be at least 1, got {envs}")
    if not mode:  # the best mode the model has that imagines at this temperature (fast: 0 or 1 only)
        mode = [m for m in available_modes(model) if m != "fast" or temperature in (None, 0.0, 1.0)][0]
    sim = BatchedWorldModelEnv(model, layout, mode, greedy=greedy_world, seed=seed,
                               temperature=temperature)
    out: list[EpisodeResult] = []
    for i in range(0, len(starts), envs):
        out += _imagine_wave(sim, layout, starts[i : i + envs])
    return out
