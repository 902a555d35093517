"""Acting: the model as a policy in real environments, batched across environments.

`run_episodes` steps `envs` real environments at once. Each row of the stream receives what
really happened (reward, end, next observation), and the model's next token after an
observation — restricted to action ids — is the action (greedy, or sampled). A planner
(worldloom.world.rollout.plan) can replace the plain policy: it gets the runner and picks actions
by imagining ahead.

With ``record=True`` every episode is also returned as an ``Episode`` (the schema of
worldloom.world.data.episodes), and a ``teacher`` (e.g. ``collect.BotTeacher``) labels each state
with the expert's action before the model's action is taken: on-policy data for DAgger
(worldloom.world.data.onpolicy).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from tqdm import tqdm

from ..envs import make_adapter
from ..data.episodes import Episode
from ...inference.sampling import sample
from .runner import StreamRunner
from ..stream import StreamLayout


@dataclass
class EpisodeResult:
    seed: int
    success: bool
    ret: float
    length: int
    episode: Episode | None = None  # with record=True
    achievements: tuple[str, ...] = ()  # environments that report them (Crafter's info["achievements"]): those unlocked


class _Recording:
    """One episode being played: its frames, actions, rewards and labels."""

    def __init__(self, adapter, seed: int, obs):
        self.adapter, self.seed = adapter, seed
        self.mission = adapter.mission(obs)
        self.frames = [adapter.observe(obs)]
        self.actions, self.rewards, self.labels = [], [], []
        self.terminated = self.truncated = False

    def add(self, action: int, reward: float, obs, terminated: bool, truncated: bool, label: int) -> None:
        self.actions.append(action)
        self.rewards.append(reward)
        self.labels.append(label)
        self.frames.append(self.adapter.observe(obs))
        self.terminated, self.truncated = bool(terminated), bool(truncated)

    def episode(self, labelled: bool) -> Episode:
        T = len(self.actions)
        return Episode(seed=self.seed, mission=self.mission,
                       obs={k: np.stack([f[k] for f in self.frames]) for k in self.adapter.obs_fields},
                       action=np.array(self.actions, np.int64), reward=np.array(self.rewards, np.float32),
                       terminated=self.terminated, truncated=self.truncated, random_action=np.zeros(T, bool),
                       label=np.array(self.labels, np.int64) if labelled else None)


def _stack(obs_list: list[dict], adapter) -> dict:
    fields = [adapter.observe(o) for o in obs_list]
    return {k: np.stack([f[k] for f in fields]) for k in fields[0]}


def level_missions(env_id: str, seeds: list[int]) -> list[str]:
    """The mission the environment writes for each seed (a reset each, nothing played)."""
    adapter = make_adapter(env_id)
    env = adapter.make()
    try:
        return [adapter.mission(env.reset(seed=int(s))[0]) for s in seeds]
    finally:
        env.close()


def other_missions(own: list[str]) -> list[str]:
    """For each level, the mission of the next level (wrapping) whose mission differs from its own (its own if none does)."""
    out = []
    for i, m in enumerate(own):
        others = [own[(i + k) % len(own)] for k in range(1, len(own))]
        out.append(next((o for o in others if o != m), m))
    return out


class UniformRandom:
    """A planner that ignores the model: uniformly random actions (the random agent of Crafter's tables),
    seeded, played through ``run_episodes`` so that it meets the same levels, limits and achievement count."""

    def __init__(self, n_actions: int, seed: int = 0):
        self.n_actions, self.rng = int(n_actions), np.random.default_rng(seed)

    def choose(self, runner, h) -> np.ndarray:
        return self.rng.integers(self.n_actions, size=len(h))


def run_episodes(model, layout: StreamLayout, env_id: str, seeds: list[int], envs: int = 64, greedy: bool = True,
                 precision: str = "fp32", seed: int = 0, planner=None, progress: bool = False, desc: str = "act",
                 record: bool = False, teacher=None, max_steps: int = 0, voices: list | None = None,
                 missions: list | None = None) -> list[EpisodeResult]:
    """Play one episode per seed in the real environment with the model's actions (``max_steps`` > 0: each
    episode cut, truncated, after that many steps). ``voices`` (one per seed, a ``Voice`` or None): the
    mission of that episode is heard, spoken in that voice (``StreamLayout.prefix(mission, voice)``; a
    layout with audio tokens), instead of read. ``missions`` (one per seed, a string or None): the mission the
    model is given instead of the environment's own (a control: how much the mission is worth).

    ``teacher(env)``, called after each reset, returns a labeller whose ``label()`` gives the
    expert's action in the current state (-1: none) and whose ``taken(action)`` is told the action
    the model then took."""
    adapter = make_adapter(env_id)
    gen = torch.Generator().manual_seed(seed)
    runner = StreamRunner(model, layout, precision)
    results: list[EpisodeResult] = []
    bar = tqdm(total=len(seeds), desc=desc, disable=not progress or None, leave=False, dynamic_ncols=True)
    for name, given in (("voices", voices), ("missions", missions)):
        if given is not None and len(given) != len(seeds):
            raise ValueError(f"{len(given)} {name} for {len(seeds)} seeds")
    none = [None] * len(seeds)
    todo = list(zip(seeds, voices if voices is not None else none, missions if missions is not None else none))
    pool = [adapter.make() for _ in range(min(envs, len(seeds)))]
    while todo:
        heard, todo = todo[: len(pool)], todo[len(pool):]
        wave = [s for s, _, _ in heard]
        active = pool[: len(wave)]
        obs = [env.reset(seed=s)[0] for env, s in zip(active, wave)]
        prefixes = [layout.prefix(adapter.mission(o) if m is None else m, v) for o, (_, v, m) in zip(obs, heard)]
        recs = [_Recording(adapter, s, o) for s, o in zip(wave, obs)] if record else None
        teachers = [teacher(env) for env in active] if teacher is not None else None
        h = runner.reset(prefixes, layout.encode_obs(_stack(obs, adapter)))
        alive = np.arange(len(wave))  # wave indices of the rows still in the runner
        ret = np.zeros(len(wave))
        length = np.zeros(len(wave), dtype=np.int64)
        done = np.zeros(len(wave), dtype=bool)
        unlocked: list[tuple[str, ...]] = [()] * len(wave)
        while len(alive):
            if planner is not None:
                actions = planner.choose(runner, h)
            else:
                actions = layout.decode_action(sample(runner.logits(h), 0.0 if greedy else 1.0, generator=gen).cpu().numpy())
            nxt, rew, term, trunc = [], np.zeros(len(alive)), np.zeros(len(alive), bool), np.zeros(len(alive), bool)
            for j, w in enumerate(alive):
                if done[w]:  # finished, still in the batch until the next compaction: dummy outcome
                    nxt.append(obs[w])
                    continue
                a = int(actions[j])
                label = teachers[w].label() if teachers is not None else -1
                o, r, te, tr, info = active[w].step(a)
                tr = tr or (max_steps > 0 and length[w] + 1 >= max_steps)
                if "achievements" in info:
                    unlocked[w] = tuple(sorted(k for k, n in info["achievements"].items() if n > 0))
                if teachers is not None:
                    teachers[w].taken(a)
                if recs is not None:
                    recs[w].add(a, r, o, te, tr, label)
                obs[w] = o
                nxt.append(o)
                rew[j], term[j], trunc[j] = r, te, tr
                ret[w] += r
                length[w] += 1
                if te or tr:
                    done[w] = True
                    bar.update(1)
            outcome = np.stack([layout.action_ids(actions), layout.reward_ids(rew), layout.done_ids(term, trunc)], axis=1)
            tail = np.concatenate([outcome, layout.encode_obs(_stack(nxt, adapter))], axis=1)  # a r d obs'
            still = ~done[alive]
            if not still.any():
                break
            if still.sum() <= 0.75 * len(alive):  # drop finished rows (one re-prefill) once enough have ended
                rows = np.flatnonzero(still)
                h = runner.keep(rows, append=tail[rows])
                alive = alive[rows]
            else:
                h = runner.feed(tail)[:, -1]
        for w, s in enumerate(wave):
            results.append(EpisodeResult(int(s), bool(ret[w] > 0), float(ret[w]), int(length[w]),
                                         recs[w].episode(teachers is not None) if recs is not None else None,
                                         unlocked[w]))
    bar.close()
    for env in pool:
        env.close()
    return results
