"""PPO fine-tuning of a world run's policy in the real environment or inside its own world model (`worldloom tune ppo RUN`).

This module lives in ``world/`` because it needs what only a world run has (the environment
adapter, the stream layout, the acting agent); the PPO core it drives, ``worldloom.rl``, knows
nothing of worlds, so that RLHF can reuse it.

One update:

1. **Collect.** The current model plays ``rl.episodes`` real episodes (default ``rl.envs``),
   ``rl.envs`` environments at once, through ``run_episodes`` (the ``StreamRunner``; actions
   sampled at temperature 1 from the logits restricted to the action ids). Seeds come from the
   split ``rl`` (``data.seed + 3_000_000 + i``, worldloom.world.data.collect): never the
   training, validation or held-out evaluation levels. With ``rl.world=imagined`` the episodes
   are imagined instead (``imagine_episodes``, worldloom.world.rollout.imagined, as IRIS and
   DreamerV3 learn): the real environment is only reset at the same seeds, for the first
   observation, the mission and the step limit; every reward, end and next observation after
   that is the model's own prediction (``rl.imagine_mode``, ``rl.imagine_greedy``, ``rl.imagine_temperature``). Each row
   counts the real environment calls so far (``real_steps``: resets plus steps; in imagination
   the resets alone) beside ``env_steps`` (real steps) and ``imagined_steps``; imagined
   outcomes are reported as ``imagined_success`` / ``imagined_return``, never as ``success``.
2. **Score.** Each episode is laid out as the stream the model was trained on (``StreamLayout.
   episode``) and cut into windows that mirror the runner's roll-over (the first window holds
   as many whole steps as fit the context; each later one restarts from the prefix and the
   last ``keep`` steps, as ``StreamRunner`` does). One forward per batch of windows gives the
   hidden state at the last observation token of every step — the policy position: its logits
   over the action ids give log π(a_t) and the entropy, a ``ValueHead`` on it gives V(s_t), and
   the same forward of the frozen **reference** (the starting, behaviour-cloned model, saved
   once as ``reference.safetensors``) gives the exact KL(π ‖ π_ref) over the action ids.
   The "old" log-probabilities are this forward with the parameters before the update, so
   the first epoch starts at ratio 1 (the runner's roll-over moment can differ from these
   windows by a step: a small, documented off-policy gap).
3. **GAE** over the episodes (time-major, padded): an episode's last step is its end, whether
   terminated or truncated — BabyAI's time limit means the level was failed (reward 0), as
   BabyAI's own PPO treats it. Only an episode cut at ``rl.horizon`` goes on past its end: the
   critic's value of its last observation is added, discounted, to the cut step's reward.
4. **PPO epochs** over minibatches of windows (``worldloom.rl.ppo_loss``), stopping early once
   the approximate KL to the collecting policy passes ``rl.target_kl``. The first
   ``rl.value_warmup`` updates train the value head only. ``rl.wm_coef`` (default 1) adds the
   world-model loss (next observation, reward and end tokens) on the collected transitions: the
   policy and the world model are one network, and PPO alone (``rl.wm_coef=0``) was measured to
   wreck the world model (next frames exact 61.6% -> 4.7% after 28 updates; 60.9% with 1.0).
   In imagination the collected transitions are the model's own predictions: training on them
   would teach the world model its own mistakes (a model fitted to its samples only grows more
   sure of them, and no real data corrects it), and the only real data an imagined episode
   holds is its first observation, which has no transition to learn. So there ``rl.wm_coef``
   defaults to 0 (nothing then holds the shared world model: the KL to the reference bounds the
   policy's actions, not its frames and rewards; watch for drift on long runs); set above
   0, the loss is taken on windows drawn from the world run's own training episodes (real
   transitions collected before tuning: no new environment calls), as many as the minibatch has.
   ``rl.collect_every=N`` closes IRIS's loop: every N updates the current agent plays
   ``rl.collect_episodes`` real episodes whose transitions join that real data (kept in the run
   folder's ``collected/``), so that the world model learns where the agent now goes.

The model stays in eval mode throughout (no dropout: the ratio must be exactly 1 before the
first step) and computes in fp32 on the CPU (the acting agent's runner does too). A tuned run is a run folder like any other (``config.yaml`` of the source with the
new name, its ``stream/``, checkpoints whose ``model.safetensors`` `load_run` reads — so
`worldloom eval` and `imagine` work on it — plus ``value.safetensors``, ``rl.yaml`` and
``metrics.jsonl`` with one row per update). Resuming restores weights, value head, AdamW
moments and the RL generator (which draws each update's sampling seed and minibatch order), so
a run resumed after a kill continues the same sequence as one never stopped.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from ..checkpoint import latest_checkpoint, save_checkpoint
from ..config import RunConfig, TrainConfig, from_dict, parse_override, read_yaml, save_yaml, to_dict
from ..errors import ConfigError, DataError
from ..io import load_tensors, save_tensors
from ..losses.next_token import next_token_loss
from ..modality import step_positions
from ..rl import PPOConfig, ValueHead, categorical_terms, gae, ppo_loss
from ..rl.runs import (RL_FILE, VALUE, minibatch_groups, parse_rl_overrides, read_rl_file, restore_rng, resume_optimizer,
                       rng_state, run_updates, trim_metrics)
from ..rl.runs import ppo_epochs as run_epochs
from ..run import CONFIG, METRICS, load_world_run
from ..runtime import set_threads
from .data.collect import SEEDS_PER_SPLIT, split_seed
from .data.episodes import load_dataset, read_shard, write_shard
from .rollout.agent import EpisodeResult, run_episodes
from .rollout.imagine import MODES
from .rollout.imagined import imagine_episodes, real_starts
from .rollout.runner import steps_to_keep
from .stream import K_DONE, K_OBS, K_REWARD, PAD, StreamLayout
from .task import STREAM_DIR, dataset_dir

REFERENCE = "reference.safetensors"
COUNTS = ("episodes", "env_steps", "real_steps", "imagined_steps", "collected")  # saved in every checkpoint's state
COLLECTED = "collected"  # the RL run's folder of the real episodes the agent played for the world model (rl.collect_every)
COLLECT_SEEDS = SEEDS_PER_SPLIT // 2  # collection seeds: the upper half of the rl split (updates take the lower half)
WORLDS = ("real", "imagined")
SCREEN_BASE = COLLECT_SEEDS // 2  # rl.screen's seeds: the rl split's second quarter (updates take the first)
SCREEN_SEEDS = COLLECT_SEEDS - SCREEN_BASE


@dataclass
class RLConfig(PPOConfig):
    """The ``rl.*`` keys of `worldloom tune ppo`: the PPO settings and how the world run plays."""

    updates: int = 50  # PPO updates (each: collect, score, epochs)
    max_minutes: float = 0.0  # wall-clock budget (0 = none): no update starts after it
    envs: int = 32  # real environments played at once
    episodes: int = 0  # episodes collected per update (0 = rl.envs)
    seed: int = 0  # the RL generator: sampling seeds, minibatch order, value-head init
    # world-model loss on real transitions: the collected ones (0 = PPO alone: the shared world model drifts); in
    # imagination the world run's own training episodes, never the imagined ones. Unset: 1 real, 0 imagined
    wm_coef: float | None = None
    checkpoint_every: int = 1  # updates between checkpoints (the last update always saves)
    batch_windows: int = 32  # windows per no-grad scoring forward
    world: str = "real"  # where episodes are played: "real" (the environment) or "imagined" (the world model)
    imagine_mode: str = ""  # imagined: how the model imagines (tokens, parallel, fast; "" = the best it can)
    imagine_greedy: bool = False  # imagined: the world model's tokens by argmax instead of sampled
    imagine_temperature: float | None = None  # imagined: the world model's sampling temperature (0: argmax; unset: 1, or 0 with imagine_greedy)
    horizon: int = 0  # episodes (real or imagined) cut, truncated, after this many steps (0: the environment's limit; Crafter's is 10,000)
    # imagined: every N updates (from update 0) the current agent plays rl.collect_episodes REAL episodes (sampled)
    # whose transitions join the world-model loss's real data (IRIS's loop: collect, learn the world, learn in it)
    collect_every: int = 0
    collect_episodes: int = 0  # real episodes per collection (0 = rl.envs)
    collect_steps: int = 0  # collected real episodes cut after this many steps (0: the environment's limit)
    # real world: before update 1 the starting policy plays this many rl-split seeds greedily; the seeds it fails
    # make rl.replay of every update's episodes, in rotation (a policy near 100% sampled gives PPO no signal elsewhere)
    screen: int = 0
    replay: float = 0.5  # share of each update's episodes replayed from the screened failures (with rl.screen)

    def __post_init__(self):
        super().__post_init__()
        for name in ("updates", "envs", "checkpoint_every", "batch_windows"):
            if getattr(self, name) < 1:
                raise ConfigError(f"rl.{name} must be >= 1, got {getattr(self, name)}")
        self._check_world()
        if self.horizon < 0:
            raise ConfigError(f"rl.horizon must be >= 0 (0: the environment's step limit), got {self.horizon}")
        if self.max_minutes < 0:
            raise ConfigError(f"rl.max_minutes must be >= 0 (0: no budget), got {self.max_minutes}")
        if self.episodes < 0 or self.seed < 0 or self.wm_coef < 0:
            raise ConfigError("rl.episodes, rl.seed and rl.wm_coef must be >= 0, got "
                              f"{self.episodes}, {self.seed}, {self.wm_coef}")
        self._check_collection()
        self._check_screen()
        if self.updates * self.per_update > SEEDS_PER_SPLIT:
            raise ConfigError(f"rl.updates x episodes per update = {self.updates * self.per_update:,} is more than the "
                              f"{SEEDS_PER_SPLIT:,} seeds of the rl split")

    def _check_collection(self) -> None:
        if min(self.collect_every, self.collect_episodes, self.collect_steps) < 0:
            raise ConfigError("rl.collect_every, rl.collect_episodes and rl.collect_steps must be >= 0, got "
                              f"{self.collect_every}, {self.collect_episodes}, {self.collect_steps}")
        if not self.collect_every:
            return
        if self.world != "imagined":
            raise ConfigError("rl.collect_every is for rl.world=imagined (in the real world every update plays real episodes)")
        if self.wm_coef == 0:
            raise ConfigError("rl.collect_every collects real episodes for the world-model loss; it needs rl.wm_coef > 0")
        rounds = -(-self.updates // self.collect_every)
        if self.updates * self.per_update > COLLECT_SEEDS or rounds * (self.collect_episodes or self.envs) > COLLECT_SEEDS:
            raise ConfigError(f"with rl.collect_every, updates and collections each have {COLLECT_SEEDS:,} seeds of the rl split")

    def _check_screen(self) -> None:
        if self.screen < 0 or not 0.0 <= self.replay < 1.0:
            raise ConfigError(f"rl.screen must be >= 0 and rl.replay in [0, 1), got {self.screen}, {self.replay}")
        if not self.screen:
            return
        if self.world != "real":
            raise ConfigError("rl.screen is for rl.world=real (it plays real episodes; imagination uses none)")
        if self.screen > SCREEN_SEEDS or self.updates * self.per_update > SCREEN_BASE:
            raise ConfigError(f"with rl.screen, the screen has {SCREEN_SEEDS:,} seeds of the rl split and the updates "
                              f"{SCREEN_BASE:,}; got rl.screen={self.screen:,} and {self.updates * self.per_update:,} episodes")

    def _check_world(self) -> None:
        if self.world not in WORLDS:
            raise ConfigError(f"rl.world must be one of {', '.join(WORLDS)}, got {self.world!r}")
        if self.imagine_mode not in ("", *MODES):
            raise ConfigError(f"rl.imagine_mode must be one of {', '.join(MODES)} (or empty: the best the model can), "
                              f"got {self.imagine_mode!r}")
        if self.wm_coef is None:
            self.wm_coef = 1.0 if self.world == "real" else 0.0
        if self.imagine_temperature is not None and self.imagine_temperature < 0:
            raise ConfigError(f"rl.imagine_temperature must be >= 0 (0: argmax), got {self.imagine_temperature}")
        if self.imagine_greedy and self.imagine_temperature not in (None, 0.0):
            raise ConfigError(f"rl.imagine_greedy=true is temperature 0; it contradicts rl.imagine_temperature="
                              f"{self.imagine_temperature} (set one of them)")
        if self.imagine_mode == "fast" and self.imagine_temperature not in (None, 0.0, 1.0):
            raise ConfigError(f"rl.imagine_mode=fast imagines at temperature 0 or 1, got rl.imagine_temperature="
                              f"{self.imagine_temperature}: use tokens or parallel")

    @property
    def per_update(self) -> int:
        return self.episodes or self.envs


# ---------------------------------------------------------------- episodes -> scored stream windows


def windows(prefix_len: int, steps: int, step_cost: int, context: int, obs_cost: int) -> list[tuple[int, int, int]]:
    """(start, first scored step, end) of each window of an episode, as StreamRunner rolls over. Counted in
    model positions: a step costs ``step_cost``, its observation ``obs_cost``. A window takes steps while
    their observation (where the policy reads) still fits the context; then the runner rebuilds from the
    prefix, the ``keep`` latest whole steps and the new observation."""
    fit = (context - prefix_len - obs_cost) // step_cost + 1  # steps whose observation fits behind the prefix
    if fit < 1:
        raise ConfigError(f"the model context {context} cannot hold the mission ({prefix_len} tokens) and one observation")
    keep = steps_to_keep(context, prefix_len, obs_cost, step_cost)  # = min(fit - 1, about half the context)
    out, s = [(0, 0, min(fit, steps))], fit
    while s < steps:
        start = s - keep
        out.append((start, s, min(start + fit, steps)))
        s = start + fit
    return out


@dataclass
class Rollout:
    """One update's episodes as flat per-step samples and the stream windows that score them."""

    actions: torch.Tensor  # (M,) action index taken at each step (episodes one after the other)
    rewards: np.ndarray  # (M,)
    episode_of: np.ndarray  # (M,) episode index of each sample
    step_of: np.ndarray  # (M,) step within its episode
    rows: list  # per window: (ids, slots, skip, policy positions, sample indices)
    success: list[bool]
    # episodes cut at rl.horizon: a window ending at their last observation o_T, whose value bootstraps
    # the return past the cut; as rows, with the episode's index in place of sample indices
    tails: list = field(default_factory=list)


def _row(lay: StreamLayout, seq: np.ndarray, P: int, pos: np.ndarray, index: np.ndarray, before: np.ndarray) -> tuple:
    """A window's row; ``before``: the episode's steps before the window (a place rule's skip reads them)."""
    slots = np.zeros(len(seq), np.int64)
    slots[P:] = lay.slots_at(0, len(seq) - P)
    return seq, slots, lay.skip_ids(seq, P, before), pos, index


def _tail(lay: StreamLayout, ep, tok, index: int, step_cost: int, context: int, obs_cost: int) -> tuple:
    """The window that reads episode ``ep``'s last observation o_T after its T steps, the cut step's end
    token read as "continue" (the game goes on past the cut), for V(o_T)."""
    P, T = len(tok.prefix), tok.length
    start = windows(P, T + 1, step_cost, context, obs_cost)[-1][0]
    steps = tok.steps[start:T].copy()
    if len(steps):
        steps[-1, -1] = lay.done_ids(np.zeros(1, bool), np.zeros(1, bool))[0]
    last = lay.encode_obs({k: v[T : T + 1] for k, v in ep.obs.items()})[0]  # (obs_len,)
    seq = np.concatenate([tok.prefix, steps.reshape(-1), last])
    return _row(lay, seq, P, np.array([len(seq) - 1]), np.array([index]), tok.steps[:start])


def build_rollout(layout: StreamLayout, results, context: int, step_cost: int | None = None,
                  obs_cost: int | None = None, cut: int = 0) -> Rollout:
    """``step_cost`` / ``obs_cost``: model positions of a step and of an observation (encoded observations
    take fewer than their ids; default: the ids). A window's last step ends at its observation when its
    action, reward and end would overflow the context (the next window holds them). ``cut`` (rl.horizon):
    an episode truncated after exactly that many steps also gets a tail window (`Rollout.tails`)."""
    lay = layout
    step_cost, obs_cost = step_cost or lay.step_len, obs_cost or lay.obs_len
    actions, rewards, ep_of, step_of, rows, tails = [], [], [], [], [], []
    first = 0
    for i, res in enumerate(results):
        ep = res.episode
        tok = lay.episode(ep)
        P, T = len(tok.prefix), tok.length
        for start, scored, end in windows(P, T, step_cost, context, obs_cost):
            seq = np.concatenate([tok.prefix, tok.steps[start:end].reshape(-1)])
            if P + (end - start) * step_cost > context:
                seq = seq[: len(seq) - (lay.step_len - lay.obs_len)]
            t = np.arange(scored, end)
            pos = P + (t - start) * lay.step_len + lay.obs_len - 1  # the last observation token of step t
            rows.append(_row(lay, seq, P, pos, first + t, tok.steps[:start]))
        if cut > 0 and T == cut and ep.truncated and not ep.terminated:
            tails.append(_tail(lay, ep, tok, i, step_cost, context, obs_cost))
        actions.append(ep.action)
        rewards.append(ep.reward)
        ep_of.append(np.full(T, i))
        step_of.append(np.arange(T))
        first += T
    return Rollout(torch.from_numpy(np.concatenate(actions)), np.concatenate(rewards).astype(np.float32),
                   np.concatenate(ep_of), np.concatenate(step_of), rows, [r.success for r in results], tails)


def collate(rows: list, layout: StreamLayout, wm: bool) -> dict:
    """Windows -> a right-padded batch: ids (B, L), slots, skip, the flat policy positions (b·L + i) and
    their sample indices; with ``wm`` also next-token targets weighted on observation, reward and end."""
    L = max(len(r[0]) for r in rows)
    B = len(rows)
    ids, slots, skip = (np.full((B, L), PAD, np.int64) for _ in range(3))
    flat, samples = [], []
    for b, (seq, sl, sk, pos, idx) in enumerate(rows):
        n = len(seq)
        ids[b, :n], slots[b, :n], skip[b, :n] = seq, sl, sk
        flat.append(b * L + pos)
        samples.append(idx)
    batch = {"idx": torch.from_numpy(ids), "slots": torch.from_numpy(slots), "skip": torch.from_numpy(skip),
             "flat": torch.from_numpy(np.concatenate(flat)), "samples": torch.from_numpy(np.concatenate(samples))}
    if wm:
        kinds = layout.kinds_of(ids[:, 1:])
        weight = np.isin(kinds, (K_OBS, K_REWARD, K_DONE)) & (ids[:, 1:] != PAD)
        batch["target"] = torch.from_numpy(ids[:, 1:])
        batch["weight"] = torch.from_numpy(weight.astype(np.float32))
    return batch


def policy_forward(model, layout: StreamLayout, batch: dict, wm: bool = False):
    """(action logits (M, A), hidden states (M, C) at the policy positions, world-model loss or None)."""
    skip = batch["skip"] if model.skip_proj is not None else None
    out = model(batch["idx"], slots=batch["slots"], skip=skip, head=wm)
    h = out.hidden.flatten(0, 1)[batch["flat"]]  # (M, C)
    lo = layout.offset["action"]
    logits = model.logits_of(h)[:, lo : lo + layout.n_actions].float()
    loss = next_token_loss(out.logits[:, :-1].contiguous(), batch["target"], batch["weight"]) if wm else None
    return logits, h, loss


# ---------------------------------------------------------------- one PPO update


@dataclass
class Scored:
    old_logp: torch.Tensor  # (M,)
    ref_logits: torch.Tensor  # (M, A)
    advantages: torch.Tensor  # (M,)
    returns: torch.Tensor  # (M,)
    old_values: torch.Tensor  # (M,)


@torch.no_grad()
def score(model, reference, value_head, layout: StreamLayout, ro: Rollout, cfg: RLConfig) -> Scored:
    """The policy's and the reference's view of every step before the update, then GAE."""
    M, A = len(ro.actions), layout.n_actions
    old_logp, values, ref_logits = torch.zeros(M), torch.zeros(M), torch.zeros(M, A)
    for i in range(0, len(ro.rows), cfg.batch_windows):
        batch = collate(ro.rows[i : i + cfg.batch_windows], layout, wm=False)
        idx = batch["samples"]
        logits, h, _ = policy_forward(model, layout, batch)
        old_logp[idx] = torch.log_softmax(logits, -1).gather(-1, ro.actions[idx, None]).squeeze(-1)
        values[idx] = value_head(h)
        ref_logits[idx] = policy_forward(reference, layout, batch)[0]
    rewards, vals, dones, last = time_major(ro, values)
    if ro.tails:  # episodes cut at rl.horizon: the return goes on past the cut, as the critic values o_T
        boot = torch.zeros(len(ro.success))
        for i in range(0, len(ro.tails), cfg.batch_windows):
            batch = collate(ro.tails[i : i + cfg.batch_windows], layout, wm=False)
            boot[batch["samples"]] = value_head(policy_forward(model, layout, batch)[1])
        ends = torch.from_numpy(np.bincount(ro.episode_of, minlength=len(ro.success)) - 1)  # each episode's last step
        rewards[ends, torch.arange(len(ro.success))] += cfg.gamma * boot
    adv, ret = gae(rewards, vals, dones, last, cfg.gamma, cfg.lam)
    back = (torch.from_numpy(ro.step_of), torch.from_numpy(ro.episode_of))
    return Scored(old_logp, ref_logits, adv[back], ret[back], values)


def time_major(ro: Rollout, values: torch.Tensor):
    """Flat samples -> (T_max, N) rewards, values, dones (padding after an episode's end counts as ended)
    and a zero last value: every collected episode ran to its end."""
    N, T = len(ro.success), int(ro.step_of.max()) + 1
    rewards, vals = torch.zeros(T, N), torch.zeros(T, N)
    dones = torch.ones(T, N, dtype=torch.bool)
    t, n = torch.from_numpy(ro.step_of), torch.from_numpy(ro.episode_of)
    rewards[t, n] = torch.from_numpy(ro.rewards)
    vals[t, n] = values
    last = torch.zeros(len(ro.step_of), dtype=torch.bool)
    last[:-1] = n[1:] != n[:-1]
    last[-1] = True
    dones[t, n] = last
    return rewards, vals, dones, torch.zeros(N)


def minibatches(ro: Rollout, size: int, gen: torch.Generator) -> list[list]:
    """Windows in a random order, grouped until each group scores at least ``size`` steps."""
    return [[ro.rows[w] for w in group] for group in minibatch_groups([len(r[4]) for r in ro.rows], size, gen)]


def ppo_epochs(model, value_head, opt, layout, ro: Rollout, sc: Scored, cfg: RLConfig, value_only: bool,
               gen: torch.Generator, real_rows: list | None = None) -> dict:
    """The PPO epochs of one update (worldloom.rl.runs.ppo_epochs) over minibatches of windows. The world-model
    loss is taken on the minibatch's own windows, or, given ``real_rows`` (imagination), on as many windows drawn
    from those real ones."""
    wm = cfg.wm_coef > 0 and not value_only

    def minibatch_loss(rows):
        batch = collate(rows, layout, wm=wm and real_rows is None)
        idx = batch["samples"]
        with torch.set_grad_enabled(not value_only):
            logits, h, wm_loss = policy_forward(model, layout, batch, wm="target" in batch)
            if wm and real_rows is not None:
                wm_loss = real_wm_loss(model, layout, real_rows, len(rows), gen)
        values = value_head(h if cfg.value_backbone and not value_only else h.detach())
        logp, ent, kl = categorical_terms(logits, sc.ref_logits[idx], ro.actions[idx])
        out = ppo_loss(logp, sc.old_logp[idx], sc.advantages[idx], values, sc.old_values[idx], sc.returns[idx],
                       ent, kl, cfg, value_only=value_only)
        if wm_loss is None:
            return out.total, out.parts
        return out.total + cfg.wm_coef * wm_loss, dict(out.parts, wm=float(wm_loss.detach()))

    return run_epochs(lambda: minibatches(ro, cfg.minibatch, gen), minibatch_loss, opt, cfg, value_only)


def real_wm_loss(model, layout: StreamLayout, real_rows: list, n: int, gen: torch.Generator) -> torch.Tensor:
    """The world-model loss on ``n`` windows drawn from ``real_rows`` (the world run's training episodes)."""
    pick = torch.randint(len(real_rows), (n,), generator=gen).tolist()
    return policy_forward(model, layout, collate([real_rows[i] for i in pick], layout, wm=True), wm=True)[2]


def rollout_of(model, layout: StreamLayout, results, cut: int = 0) -> Rollout:
    """Episodes -> their scored stream windows at the model's context and step costs (``cut``: rl.horizon)."""
    mc = model.cfg
    return build_rollout(layout, results, mc.context, step_positions(layout.step_len, mc.obs_len, mc.obs_vectors),
                         mc.obs_vectors or layout.obs_len, cut)


def episode_windows(model, layout: StreamLayout, episodes: list) -> list:
    """Stored real episodes -> their stream windows, for the world-model loss (only the episodes are read)."""
    return rollout_of(model, layout, [EpisodeResult(e.seed, False, 0.0, e.length, e) for e in episodes]).rows


def real_windows(cfg: RLConfig, model, layout: StreamLayout, data_path: Path, run_dir: Path | None = None,
                 update: int = 0) -> list | None:
    """In imagination with ``rl.wm_coef`` > 0: the stream windows of the world run's own training episodes
    (real transitions, collected before; no new environment calls), for the world-model loss, and of the
    episodes the agent collected before ``update`` (a resumed ``run_dir``, rl.collect_every). Else None."""
    if cfg.world == "real" or cfg.wm_coef == 0:
        return None
    try:
        episodes = [e for e in load_dataset(data_path).episodes("train") if e.length > 0]
    except DataError as e:
        raise ConfigError(f"rl.wm_coef > 0 with rl.world=imagined trains the world model on the world run's training "
                          f"episodes, which are not readable ({e}); use rl.wm_coef=0") from None
    if not episodes:
        raise ConfigError(f"rl.wm_coef > 0 with rl.world=imagined needs the world run's training episodes; {data_path} has none")
    rows = episode_windows(model, layout, episodes)
    return rows + (collected_windows(run_dir, model, layout, cfg, update) if run_dir is not None else [])


# ---------------------------------------------------------------- the run folder


@dataclass
class Tuner:
    """Everything an RL run carries from update to update."""

    run_dir: Path
    cfg: RLConfig
    env_id: str
    data_seed: int
    model: torch.nn.Module
    reference: torch.nn.Module
    value_head: ValueHead
    opt: torch.optim.Optimizer
    layout: StreamLayout
    gen: torch.Generator
    update: int = 0
    episodes: int = 0
    env_steps: int = 0  # real environment steps (none in imagination)
    real_steps: int = 0  # real environment calls: resets and steps (imagination: the resets for its first observations)
    imagined_steps: int = 0
    collected: int = 0  # real episodes the agent played for the world model (rl.collect_every)
    elapsed: float = 0.0
    real_rows: list | None = None  # imagination with rl.wm_coef > 0: windows of real episodes for the world-model loss
    hard: list = field(default_factory=list)  # rl.screen: the seeds the starting policy failed, greedy (replayed)


def parse_run_overrides(overrides: list[str], allow_run_keys: bool) -> tuple[dict, dict]:
    """`rl.key=value`, `train.threads=N` (and, for a new run, `name=` / `out_dir=`) -> (rl dict, run keys:
    "name", "out_dir", "threads")."""
    allowed = ("rl.<key>, train.threads, name and out_dir" if allow_run_keys else
               "rl.<key> and train.threads (name and out_dir are fixed once a run exists)")
    rl, rest = parse_rl_overrides(
        overrides, lambda keys: keys == ["train", "threads"] or (allow_run_keys and keys in (["name"], ["out_dir"])), allowed)
    run_keys = {}
    for text in rest:
        keys, value = parse_override(text)
        run_keys[keys[-1]] = value
    return rl, run_keys


def threads_of(run_dir: Path, overrides: list[str], allow_run_keys: bool) -> int:
    """The torch threads of a `tune ppo` process: `train.threads=N` on its command line, else the run's own."""
    threads = parse_run_overrides(overrides, allow_run_keys)[1].get("threads")
    if threads is None:  # (a folder that is not a run is reported by what loads it)
        cfg_file = Path(run_dir) / CONFIG
        threads = (read_yaml(cfg_file).get("train") or {}).get("threads", 0) if cfg_file.is_file() else 0
    return from_dict(TrainConfig, {"threads": threads}, prefix="train.").threads  # its type and range checks


def _optimizer(model, value_head, cfg: RLConfig) -> torch.optim.Optimizer:
    return torch.optim.AdamW([{"params": list(model.parameters())}, {"params": list(value_head.parameters())}],
                             lr=cfg.lr, weight_decay=0.0)


def _reference(model, weights: dict) -> torch.nn.Module:
    import copy

    ref = copy.deepcopy(model)
    ref.load_state_dict(weights, strict=False)
    ref.eval().requires_grad_(False)
    return ref


def start_tune(source: Path, overrides: list[str], log=print, progress: bool = False) -> Tuner:
    """A new RL run folder from a trained world run (the source is only read)."""
    from ..checkpoint import _unique_state

    src = load_world_run(Path(source))
    rl_dict, run_keys = parse_run_overrides(overrides, allow_run_keys=True)
    cfg = from_dict(RLConfig, rl_dict, prefix="rl.")
    run_cfg = to_dict(src.cfg)
    run_cfg["name"] = run_keys.get("name", f"{src.cfg.name}-ppo")
    run_cfg["out_dir"] = run_keys.get("out_dir", src.cfg.out_dir)
    run_cfg["data"]["path"] = str(dataset_dir(src.cfg, src.run_dir))  # `worldloom eval` of the tuned run finds the data
    new = from_dict(RunConfig, run_cfg)
    run_dir = new.run_dir
    if latest_checkpoint(run_dir) is not None or (run_dir / RL_FILE).exists():
        raise ConfigError(f"{run_dir} already holds a run; continue it with `worldloom tune ppo --resume {run_dir}` "
                          "or choose another name=")
    if run_dir.resolve() == Path(source).resolve():
        raise ConfigError("the tuned run needs its own folder; choose another name=")
    real_rows = real_windows(cfg, src.model, src.layout, Path(new.data.path))
    screened = screen_seeds(src.model, src.layout, new.env.id, new.data.seed, cfg, log, progress) if cfg.screen else None
    src.layout.save(run_dir / STREAM_DIR)
    save_yaml(run_cfg, run_dir / CONFIG)
    weights = _unique_state(src.model)
    save_tensors(run_dir / REFERENCE, {k: v.contiguous() for k, v in weights.items()})
    save_yaml({"source": str(source), "source_step": src.state.get("step"), "rl": to_dict(cfg),
               **({"screened": screened} if screened else {})}, run_dir / RL_FILE)
    torch.manual_seed(cfg.seed)
    value_head = ValueHead(src.model.cfg.d_model)
    model = src.model
    log(f"tune ppo: {source} (step {src.state.get('step')}) -> {run_dir}")
    screen = {"hard": screened["failed"], "env_steps": screened["env_steps"],
              "real_steps": screened["seeds"] + screened["env_steps"]} if screened else {}
    tu = Tuner(run_dir, cfg, new.env.id, new.data.seed, model, _reference(model, weights), value_head,
               _optimizer(model, value_head, cfg), src.layout, torch.Generator().manual_seed(cfg.seed), real_rows=real_rows,
               **screen)
    save(tu)  # update 0: a run killed before its first checkpoint resumes from the start
    return tu


def resume_tune(run_dir: Path, overrides: list[str], log=print) -> Tuner:
    """An RL run folder back at its last checkpoint (``rl.*`` overrides, e.g. more updates, apply)."""
    rl_dict, _ = parse_run_overrides(overrides, allow_run_keys=False)
    saved, cfg = read_rl_file(run_dir, RLConfig, rl_dict)
    screened = saved.get("screened") or {}
    if cfg.screen != screened.get("seeds", 0):
        raise ConfigError(f"{run_dir} was started with rl.screen={screened.get('seeds', 0)}; rl.screen is fixed when a "
                          "run starts (start a new run to screen differently)")
    run = load_world_run(run_dir)
    state = run.state
    value_head = ValueHead(run.model.cfg.d_model)
    value_head.load_state_dict(load_tensors(run.checkpoint / f"{VALUE}.safetensors", "value head"))
    opt = _optimizer(run.model, value_head, cfg)
    resume_optimizer(opt, run.checkpoint, state, cfg.lr)
    gen = restore_rng(state)
    trim_metrics(Path(run_dir) / METRICS, state["step"])
    ref = _reference(run.model, load_tensors(run_dir / REFERENCE, "reference weights"))
    log(f"tune ppo: resuming {run_dir} at update {state['step']}")
    counts = {k: int(state.get(k, 0)) for k in COUNTS}
    if "real_steps" not in state:  # a real-environment run checkpointed before real_steps was counted
        counts["real_steps"] = counts["episodes"] + counts["env_steps"]
    return Tuner(run_dir, cfg, run.cfg.env.id, run.cfg.data.seed, run.model, ref, value_head, opt, run.layout, gen,
                 update=state["step"], elapsed=float(state["elapsed"]), **counts,
                 real_rows=real_windows(cfg, run.model, run.layout, dataset_dir(run.cfg, run_dir), run_dir, state["step"]),
                 hard=[int(x) for x in screened.get("failed", [])])


def save(tu: Tuner) -> None:
    state = {"step": tu.update, "elapsed": round(tu.elapsed, 3), "precision": "fp32",
             **{k: getattr(tu, k) for k in COUNTS}, **rng_state(tu.gen)}
    save_checkpoint(tu.run_dir, tu.model, tu.opt, state, extra={VALUE: tu.value_head.state_dict()})


# ---------------------------------------------------------------- the loop


def collect(tu: Tuner, seeds: list[int], sample_seed: int, progress: bool = False) -> list:
    """One update's episodes, played in the real environment or imagined from real starts (rl.world);
    the Tuner's counts of real environment calls and imagined steps move on."""
    cfg = tu.cfg
    if cfg.world == "real":
        res = run_episodes(tu.model, tu.layout, tu.env_id, seeds, envs=cfg.envs, greedy=False, seed=sample_seed,
                           record=True, progress=progress, desc="rl episodes", max_steps=cfg.horizon)
        steps = sum(r.length for r in res)
        tu.env_steps += steps
        tu.real_steps += len(seeds) + steps
        return res
    res = imagine_episodes(tu.model, tu.layout, real_starts(tu.env_id, seeds, cfg.horizon), envs=cfg.envs, seed=sample_seed,
                           mode=cfg.imagine_mode, greedy_world=cfg.imagine_greedy,
                           temperature=cfg.imagine_temperature)
    tu.real_steps += len(seeds)  # the resets that gave the first observations
    tu.imagined_steps += sum(r.length for r in res)
    return res


def screen_seeds(model, layout: StreamLayout, env_id: str, data_seed: int, cfg: RLConfig, log=print,
                 progress: bool = False) -> dict:
    """rl.screen: the starting policy plays rl.screen seeds of the rl split's second quarter greedily; the seeds
    it fails are the ones later updates replay. Greedy, because the sampled policy's rare failures are where its
    argmax loops (e.g. left, right, left, ... until the time limit), and those states are what PPO should see."""
    seeds = [split_seed("rl", data_seed, SCREEN_BASE + i) for i in range(cfg.screen)]
    res = run_episodes(model, layout, env_id, seeds, envs=cfg.envs, greedy=True, progress=progress, desc="screen")
    failed = [r.seed for r in res if not r.success]
    steps = int(sum(r.length for r in res))
    log(f"screen: the greedy policy failed {len(failed)} of {cfg.screen} rl seeds ({steps} real steps); "
        + (f"{cfg.replay:.0%} of every update's episodes replay them" if failed else "nothing to replay"))
    return {"seeds": cfg.screen, "failed": failed, "env_steps": steps}


def update_seeds(tu: Tuner) -> tuple[list[int], int]:
    """This update's seeds and how many of them (the first ones) replay screened failures: fresh seeds of the
    rl split's first quarter, and with rl.screen a share of the failed seeds taken in rotation."""
    n = tu.cfg.per_update
    k = min(round(tu.cfg.replay * n), n - 1) if tu.hard else 0
    replay = [tu.hard[(tu.update * k + i) % len(tu.hard)] for i in range(k)]
    return replay + [split_seed("rl", tu.data_seed, tu.episodes + i) for i in range(n - k)], k


def _collected_shard(run_dir: Path, k: int) -> Path:
    return Path(run_dir) / COLLECTED / f"shard-{k:05d}.npz"


def gather_real(tu: Tuner, progress: bool = False) -> float:
    """One collection round (rl.collect_every): the current agent plays real episodes, sampled, on seeds of
    the rl split's upper half; saved as ``collected/shard-K.npz`` (a resumed run reads them back) and added to
    the real windows of the world-model loss. Counted as real environment calls. Returns their real success."""
    cfg, k = tu.cfg, tu.update // tu.cfg.collect_every
    n = cfg.collect_episodes or cfg.envs
    seeds = [split_seed("rl", tu.data_seed, COLLECT_SEEDS + tu.collected + i) for i in range(n)]
    res = run_episodes(tu.model, tu.layout, tu.env_id, seeds, envs=cfg.envs, greedy=False, seed=cfg.seed * 7919 + k,
                       record=True, progress=progress, desc="collect real", max_steps=cfg.collect_steps)
    write_shard(_collected_shard(tu.run_dir, k), [r.episode for r in res])
    tu.real_rows += rollout_of(tu.model, tu.layout, res).rows
    steps = sum(r.length for r in res)
    tu.env_steps += steps
    tu.real_steps += n + steps
    tu.collected += n
    return float(np.mean([r.success for r in res]))


def collected_windows(run_dir: Path, model, layout: StreamLayout, cfg: RLConfig, update: int) -> list:
    """The windows of the collection rounds done before ``update`` (a resumed run's share of the real data)."""
    if not cfg.collect_every:
        return []
    rounds = -(-update // cfg.collect_every)
    eps = []
    for k in range(rounds):
        try:
            eps += read_shard(_collected_shard(run_dir, k))
        except (DataError, OSError) as e:
            raise ConfigError(f"{run_dir} is missing the real episodes of collection round {k} ({e}); "
                              "it cannot resume as it ran") from None
    return episode_windows(model, layout, eps)


def outcome_row(tu: Tuner, res: list) -> dict:
    """An update's outcome and the counts so far: real outcomes, or the IMAGINED ones (the model's own
    rewards, keys ``imagined_*``) with the real environment calls that imagination used."""
    pre = "" if tu.cfg.world == "real" else "imagined_"
    row = {f"{pre}success": float(np.mean([r.success for r in res])), f"{pre}return": float(np.mean([r.ret for r in res])),
           f"{pre}length": float(np.mean([r.length for r in res])), "episodes": tu.episodes, "env_steps": tu.env_steps,
           "real_steps": tu.real_steps}
    if pre:
        row["imagined_steps"] = tu.imagined_steps
    if tu.cfg.collect_every:
        row["collected"] = tu.collected
    return row


def one_update(tu: Tuner, progress: bool = False) -> dict:
    """Collect, score, PPO epochs; the metrics row of this update."""
    cfg, n = tu.cfg, tu.cfg.per_update
    seeds, k = update_seeds(tu)
    collected = {}
    if cfg.collect_every and tu.update % cfg.collect_every == 0:
        collected = {"collected_success": gather_real(tu, progress)}
    sample_seed = int(torch.randint(2**31 - 1, (1,), generator=tu.gen))
    res = collect(tu, seeds, sample_seed, progress)
    ro = rollout_of(tu.model, tu.layout, res, cfg.horizon)
    sc = score(tu.model, tu.reference, tu.value_head, tu.layout, ro, cfg)
    value_only = tu.update < cfg.value_warmup
    parts = ppo_epochs(tu.model, tu.value_head, tu.opt, tu.layout, ro, sc, cfg, value_only, tu.gen, tu.real_rows)
    tu.update += 1
    tu.episodes += n
    replayed = {"replayed_success": float(np.mean([r.success for r in res[:k]])),
                "replayed_length": float(np.mean([r.length for r in res[:k]]))} if k else {}
    return {"update": tu.update, **outcome_row(tu, res), **replayed, **collected, "value_only": value_only, **parts}


def tune_ppo(tu: Tuner, progress: bool = True, log=print) -> dict:
    """Run updates until rl.updates; checkpoint every rl.checkpoint_every and at the end."""
    tu.model.eval()
    key = "success" if tu.cfg.world == "real" else "imagined_success"
    row = run_updates(tu, lambda: one_update(tu), lambda: save(tu),
                      lambda r: {key: f"{r[key]:.0%}", "episodes": tu.episodes, "kl": f"{r.get('kl', 0):.3f}"},
                      lambda r: f"update {tu.update}: {key.replace('_', ' ')} {r[key]:.1%}, {tu.episodes} episodes, "
                                f"{tu.real_steps} real env calls",
                      progress=progress, log=log, max_seconds=tu.cfg.max_minutes * 60)
    where = "" if tu.cfg.world == "real" else f" ({tu.imagined_steps} imagined)"
    log(f"done: {tu.update} updates, {tu.episodes} episodes ({tu.cfg.world}), real environment: {tu.real_steps} calls "
        f"(resets + {tu.env_steps} steps){where}; run folder {tu.run_dir} (evaluate with `worldloom eval {tu.run_dir}`)")
    return {"run_dir": str(tu.run_dir), "updates": tu.update, "world": tu.cfg.world, key: row.get(key),
            **{k: getattr(tu, k) for k in COUNTS}}


def tune(source: Path | None, overrides: list[str], resume: Path | None = None, progress: bool = True, log=print) -> dict:
    """`worldloom tune ppo`: a new RL run from ``source``, or ``resume`` an RL run folder."""
    set_threads(threads_of(resume if resume is not None else source, overrides, allow_run_keys=resume is None))
    tu = resume_tune(resume, overrides, log) if resume is not None else start_tune(source, overrides, log, progress)
    return tune_ppo(tu, progress=progress, log=log)
