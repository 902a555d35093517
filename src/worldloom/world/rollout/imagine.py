"""Imagination: the world model as an environment.

`BatchedWorldModelEnv` runs B imagined environments in lockstep whose dynamics are the model.
Each starts from a REAL first observation and mission; then every ``step(actions)`` feeds the
action tokens and lets the model predict the reward, the end of the episode and the next
observation, feeding its own predictions back (the cache lives in a `StreamRunner`):

    a_t (given) -> r_t, d_t (predicted, one token each) -> o_{t+1} (predicted)

The next observation is predicted either token by token (``mode="tokens"``: one single-token
forward per token, so 53 forwards per step: a, r, d and the 50 observation tokens), or with
the frame head (``mode="parallel"``: r and d token by token, then all 50 observation tokens in
one frame-head pass, fed back as one chunk of 50: 4 forwards per step), or with the frame head's
frame verified token by token (``mode="fast"``, `worldloom.world.rollout.fast`: exactly the
``tokens`` frame when greedy, the same distribution when sampling, in 4 forwards per step where
the head is right). Every predicted token is restricted to the ids its position may hold, and
chosen greedily (argmax) or sampled (from a seeded ``torch.Generator``). ``stats``
(`ImagineStats`) counts forwards per imagined step and, in fast mode, the drafts accepted.

Imagined streams never stop by themselves: a stream that imagined an end (or reached the step
limit) keeps stepping on whatever actions it gets, harmlessly; callers ignore its outputs
(``done`` tells which rows have ended) or drop it with ``keep(rows)``.

`WorldModelEnv` is the single-environment ``gymnasium.Env`` on top (the observation form,
space and pictures come from the environment adapter, ``worldloom.world.envs``; ``reset(seed=s)``
imagines from the real start of seed s). The rest are evaluations and pictures:
`open_loop_accuracy` (imagine whole held-out episodes from their first observation under their
real actions, never corrected), `imagined_vs_real` + `write_rollout_gif` (a side-by-side GIF)
and `imagination_throughput` (imagined steps per second).
"""

from __future__ import annotations

import io
import time
from pathlib import Path
from typing import NamedTuple

import gymnasium as gym
import numpy as np
import torch

from ...io import atomic_write_bytes
from ..envs import make_adapter
from ..envs.pixels import PIXELS
from ..eval.metrics import seen_cell_accuracy
from ...inference.sampling import sample
from .fast import ImagineStats, Pace, check_fast, imagine_frame, tokens_frame
from .runner import StreamRunner
from ..stream import StreamLayout

MODES = ("tokens", "parallel", "fast")


def _check_mode(model, mode: str) -> str:
    """The mode a model imagines in: ``mode``, except that a model with encoded observations
    (worldloom.modality) always predicts whole frames ("parallel": its decoder's frame is its own answer)."""
    if mode not in MODES:
        raise ValueError(f"mode must be one of {', '.join(MODES)}, got {mode!r}")
    if getattr(model, "obs_decoder", None) is not None:
        return "parallel"
    if mode == "fast":
        check_fast(model)
    if mode == "parallel" and getattr(model, "frame", None) is None:
        raise ValueError("mode='parallel' needs a model with a frame head (train with stream.parallel_obs=true); "
                         "use mode='tokens' for this model")
    return mode


def available_modes(model) -> list[str]:
    """The modes ``model`` can imagine in, the best first: ``fast`` (lossless, fewest forwards),
    ``parallel``, ``tokens`` (what `_check_mode` accepts; an encoded-observation model: ``parallel``)."""
    modes = []
    for mode in ("fast", "parallel", "tokens"):
        try:
            got = _check_mode(model, mode)
        except ValueError:
            continue
        if got not in modes:
            modes.append(got)
    return modes


def env_max_steps(env_id: str) -> int:
    """The real environment's own step limit (after one reset, as MiniGrid sets it there)."""
    adapter = make_adapter(env_id)
    env = adapter.make()
    try:
        env.reset(seed=0)
        return adapter.max_steps(env)
    finally:
        env.close()


# ------------------------------------------------------------------------------ batched env


class BatchedWorldModelEnv:
    """B imagined environments stepped together by the model.

    model, layout: a world model (`LWM`) and its `StreamLayout`.
    mode: "tokens" (token-by-token observations), "parallel" (the frame head) or "fast" (the frame
        head's drafts verified: the tokens result; worldloom.world.rollout.fast). The last two
        need a frame head (ValueError otherwise); ``redraft``: fast mode's drafts after a
        rejection ("verify" or "head", see worldloom.world.rollout.fast); ``pace``: fast mode
        imagines a frame token by token where the clock says that is faster at this batch size
        (large batches on a CPU; the same frames: `worldloom.world.rollout.fast.Pace`); False:
        always drafts.
    greedy: argmax tokens (deterministic) or samples from the softmax (seeded by ``seed``).
    temperature: (overrides ``greedy``) the sampling temperature of every imagined token; 0 is argmax.
        Below 1 the world keeps fewer unlikely tokens: sampled at 1, the token stream of the BabyAI
        preset often imagines the mission's object straight in front of the agent (BENCHMARKS.md).
        ``fast`` mode takes 0 or 1 only.
    max_steps: imagined episodes are truncated after this many steps (None: ``env_id``'s own
        limit when an env id is given, otherwise no limit besides the model's own predictions).

    After ``reset`` and after every ``step``, ``h`` (B, C) is the hidden state after the latest
    observation (the policy's input: ``policy_logits()``), ``t`` (B,) the steps taken and
    ``done`` (B,) whether each row has imagined an end (terminated or truncated); ``stats``
    (`ImagineStats`) the forwards per imagined step and (fast) the drafts accepted, since creation.
    """

    def __init__(self, model, layout: StreamLayout, mode: str = "tokens", greedy: bool = True, seed: int = 0,
                 max_steps: int | None = None, env_id: str | None = None, precision: str = "fp32",
                 device: str | torch.device = "cpu", redraft: str = "verify", temperature: float | None = None,
                 pace: bool = True):
        mode = _check_mode(model, mode)
        temperature = (0.0 if greedy else 1.0) if temperature is None else float(temperature)
        if temperature < 0:
            raise ValueError(f"temperature must be >= 0 (0: argmax), got {temperature}")
        if mode == "fast" and temperature not in (0.0, 1.0):
            raise ValueError(f"fast imagination is argmax or sampled at temperature 1, got {temperature}: use tokens or parallel")
        greedy = temperature == 0.0
        if max_steps is None and env_id is not None:
            max_steps = env_max_steps(env_id)
        if max_steps is not None and max_steps < 1:
            raise ValueError(f"max_steps must be at least 1, got {max_steps}")
        self.model, self.layout, self.mode, self.greedy, self.temperature = model, layout, mode, bool(greedy), temperature
        self.max_steps, self.redraft = max_steps, redraft
        self.pace = Pace() if mode == "fast" and pace else None
        self.runner = StreamRunner(model, layout, precision, device)
        self.generator = torch.Generator(device=self.runner.device)
        self.reseed(seed)
        self.stats = ImagineStats()
        self.h: torch.Tensor | None = None
        self.last_ids: np.ndarray | None = None  # (B, obs_len) stream ids of the latest imagined observation
        self.t = np.zeros(0, np.int64)
        self.done = np.zeros(0, bool)

    @property
    def batch(self) -> int:
        return self.runner.batch

    def reseed(self, seed: int) -> None:
        """Restart the sampling generator (only sampling uses it; greedy mode is deterministic)."""
        self.generator.manual_seed(int(seed))

    def reset(self, missions: list[str], first_obs: dict) -> dict:
        """Start B streams from real first observations: missions (B strings) and batched fields
        (as the env adapter stores them, e.g. ``image`` (B, 7, 7, 3), ``direction`` (B,)). Returns
        the first observations as the stream holds them (a copy, in the stored dtypes)."""
        lay = self.layout
        shapes = {k: np.shape(v) for k, v in first_obs.items()}
        if any(s[:1] != (len(missions),) for s in shapes.values()):
            raise ValueError(f"reset needs one first observation per mission: {len(missions)} missions, "
                             f"fields of shapes {shapes}")
        if not len(missions):
            raise ValueError("reset needs at least one mission")
        first = lay.encode_obs(first_obs)  # (B, obs_len)
        self.h = self.runner.reset([lay.prefix(m) for m in missions], first)
        self.t = np.zeros(len(missions), np.int64)
        self.done = np.zeros(len(missions), bool)
        return lay.decode_obs(first)  # observation tokenizers are lossless

    def policy_logits(self) -> torch.Tensor:
        """The model's policy (B, V) after the latest observation (restricted to action ids)."""
        if self.h is None:
            raise RuntimeError("call reset() first")
        return self.runner.logits(self.h, self.layout.obs_len)

    def policy_actions(self) -> np.ndarray:
        """The model's own actions (B,) env indices after the latest observation: its policy, greedy or
        sampled as its imagined tokens are (the world model is also the agent)."""
        return self.layout.decode_action(self._pick(self.policy_logits()))

    def _pick(self, logits: torch.Tensor) -> np.ndarray:
        return sample(logits, self.temperature, generator=self.generator).cpu().numpy()

    def step(self, actions) -> tuple[dict, np.ndarray, np.ndarray, np.ndarray]:
        """Imagine one step for every row: actions (B,) env action indices ->
        (obs fields, e.g. {"image": (B,7,7,3) uint8, "direction": (B,) uint8}, reward (B,) float32,
        terminated (B,) bool, truncated (B,) bool). Rows that already ended step on harmlessly."""
        if self.h is None:
            raise RuntimeError("call reset() first")
        lay, run = self.layout, self.runner
        B = run.batch
        actions = np.asarray(actions, np.int64).reshape(-1)
        if len(actions) != B:
            raise ValueError(f"step needs {B} actions (one per stream), got {len(actions)}")
        if actions.min() < 0 or actions.max() >= lay.n_actions:
            raise ValueError(f"actions must be in [0, {lay.n_actions}), got {actions.tolist()}")
        before, t0 = run.forwards, time.perf_counter()
        h = run.feed(lay.action_ids(actions)[:, None])[:, -1]
        r_id = self._pick(run.logits(h))
        h = run.feed(r_id[:, None])[:, -1]
        d_id = self._pick(run.logits(h))
        h = run.feed(d_id[:, None])[:, -1]
        if self.pace is not None:  # three one-token steps: what a token-by-token frame's steps cost
            self.pace.tokens(B, time.perf_counter() - t0, 3)
        if self.mode == "parallel":
            obs = self._pick(run.frame(h)).reshape(B, lay.obs_len)  # the whole next observation at once
            self.stats.frame_passes += 1
            h = run.feed(obs)[:, -1]
        elif self.mode == "fast":
            obs, h = imagine_frame(run, h, self.greedy, self.generator, self.stats, self.redraft, self.pace)
        else:
            obs, h = tokens_frame(run, h, self.temperature, self.generator)
        self.h, self.last_ids = h, obs  # (B, obs_len) the imagined observation's stream ids
        self.stats.steps += 1
        self.stats.forwards += run.forwards - before
        self.t = self.t + 1
        fields = lay.decode_obs(obs)
        reward = lay.decode_reward(r_id).astype(np.float32)
        terminated, truncated = lay.decode_done(d_id)
        if self.max_steps is not None:
            truncated = truncated | (self.t >= self.max_steps)
        truncated = truncated & ~terminated
        self.done = self.done | terminated | truncated
        return fields, reward, terminated, truncated

    def keep(self, rows) -> None:
        """Continue only the given rows (e.g. those whose outputs still matter): one re-prefill."""
        rows = np.asarray(rows, np.int64).reshape(-1)
        if not len(rows):
            raise ValueError("keep needs at least one row (reset to start new streams)")
        self.h = self.runner.keep(rows)
        self.t, self.done = self.t[rows], self.done[rows]


# ---------------------------------------------------------------------------- gymnasium env


class WorldModelEnv(gym.Env):
    """One imagined environment as a ``gymnasium.Env``: observations in the real environment's form
    (its adapter's ``env_obs`` and ``observation_space``; for MiniGrid image, direction and mission),
    pictures drawn by the adapter (``render_mode="rgb_array"``).

    Build it from a world run (a folder or a `LoadedRun`; the env id defaults to the run's
    ``env.id``), or from ``model=``, ``layout=`` and ``env_id=``. ``reset(seed=s)`` resets the
    REAL environment with seed s for the first observation and mission (without a seed, one is
    drawn from the env's own generator), then every ``step`` is imagined by the model.
    Greedy decoding is deterministic; sampling is seeded from ``reset``'s seed too.
    Episodes are truncated at the real environment's step limit (or ``max_steps``).
    """

    metadata = {"render_modes": ["rgb_array"], "render_fps": 4}

    def __init__(self, run=None, *, model=None, layout: StreamLayout | None = None, env_id: str | None = None,
                 mode: str = "tokens", greedy: bool = True, render_mode: str | None = None, tile_size: int = 16,
                 precision: str = "fp32", device: str | torch.device = "cpu", max_steps: int | None = None):
        if run is not None:
            if isinstance(run, (str, Path)):
                from ...run import load_world_run

                run = load_world_run(Path(run), device)
            model, layout = run.model, run.layout
            env_id = env_id or run.cfg.env.id
        if model is None or layout is None or env_id is None:
            raise ValueError("WorldModelEnv needs a world run, or model=, layout= and env_id=")
        if render_mode is not None and render_mode not in self.metadata["render_modes"]:
            raise ValueError(f"render_mode must be None or one of {self.metadata['render_modes']}, got {render_mode!r}")
        self.adapter = make_adapter(env_id)
        if self.adapter.n_actions != layout.n_actions:
            raise ValueError(f"{env_id} has {self.adapter.n_actions} actions but the model's stream has {layout.n_actions}")
        self.env_id, self.render_mode, self.tile_size, self._max_steps = env_id, render_mode, int(tile_size), max_steps
        self._real = self.adapter.make()
        self._sim = BatchedWorldModelEnv(model, layout, mode, greedy, max_steps=max_steps, precision=precision, device=device)
        self.observation_space = self.adapter.observation_space()
        self.action_space = gym.spaces.Discrete(layout.n_actions)
        self._fields: dict[str, np.ndarray] | None = None  # the latest observation, as stored (no batch axis)
        self._mission = ""
        self.real_seed: int | None = None

    def _obs(self, fields: dict[str, np.ndarray]):
        self._fields = {k: np.array(v, copy=True) for k, v in fields.items()}
        return self.adapter.env_obs(self._fields, self._mission)

    def reset(self, *, seed: int | None = None, options: dict | None = None):
        super().reset(seed=seed)
        real_seed = int(seed) if seed is not None else int(self.np_random.integers(2**31 - 1))
        self._sim.reseed(int(self.np_random.integers(2**62)))
        raw, _ = self._real.reset(seed=real_seed)
        fields = self.adapter.observe(raw)
        self._mission = self.adapter.mission(raw)
        if self._max_steps is None:
            self._sim.max_steps = self.adapter.max_steps(self._real)
        self._sim.reset([self._mission], {k: v[None] for k, v in fields.items()})
        self.real_seed = real_seed
        return self._obs(fields), {"real_seed": real_seed}

    def step(self, action):
        if self._fields is None:
            raise RuntimeError("call reset() before step()")
        if not self.action_space.contains(action):
            raise ValueError(f"invalid action {action!r}; actions are 0..{self.action_space.n - 1}")
        obs, reward, terminated, truncated = self._sim.step(np.array([int(action)]))
        out = self._obs({k: v[0] for k, v in obs.items()})
        return out, float(reward[0]), bool(terminated[0]), bool(truncated[0]), {}

    def render(self):
        if self.render_mode is None:
            gym.logger.warn("WorldModelEnv.render() was called without a render_mode (use render_mode='rgb_array')")
            return None
        if self._fields is None:
            raise RuntimeError("call reset() before render()")
        return self.adapter.render(self._fields, self.tile_size)

    def close(self):
        if self._real is not None:
            self._real.close()
            self._real = None


# ---------------------------------------------------------------------- open-loop accuracy


class _OpenLoopTally:
    """Counts of right imagined frames and cells per horizon k = 1..K (see open_loop_accuracy)."""

    NAMES = ("frame", "cell", "cells", "dir", "n", "known", "n_known")
    MASKS = ("seen", "shown")  # scored on the cells an earlier real observation showed / the model was shown

    def __init__(self, K: int, novel, seen, shown=None):
        self.K, self.masks = K, {"seen": seen, "shown": shown}
        self.c = {name: np.zeros(K, np.int64) for name in self.NAMES}
        for m in self.MASKS:
            self.c.update({m: np.zeros(K, np.int64), f"{m}_right": np.zeros(K, np.int64),
                           f"{m}_cells": np.zeros(K, np.int64), f"n_{m}": np.zeros(K, np.int64)})
        # per episode, (T,) bool: o_1..o_k revealed nothing new (None: the adapter cannot tell)
        self.clean = None if novel is None else [None if v is None else np.cumsum(np.asarray(v) > 0) == 0 for v in novel]

    def add(self, k: int, episodes: list[int], pred: tuple, real: tuple) -> None:
        """Imagined o_k against the real one, one row per episode index in ``episodes``: ``pred`` and ``real``
        are (cells (n, V, V, C), direction (n,)) as ``_compared`` gives them."""
        c, i = self.c, k - 1
        (pred_img, pred_dir), (real_img, real_dir) = pred, real
        cells = (pred_img == real_img).all(-1).reshape(len(real_img), -1)  # (n, cells)
        dirs = pred_dir.astype(np.int64) == real_dir
        c["frame"][i] += int((cells.all(1) & dirs).sum())
        c["cell"][i] += int(cells.sum())
        c["cells"][i] += cells.size
        c["dir"][i] += int(dirs.sum())
        c["n"][i] += len(real_img)
        if self.clean is not None:
            for j, e in enumerate(episodes):
                if self.clean[e] is not None and self.clean[e][i]:
                    c["n_known"][i] += 1
                    c["known"][i] += int(cells[j].all() and dirs[j])
        for m, mask in self.masks.items():
            have = [j for j, e in enumerate(episodes) if mask is not None and mask[e] is not None]
            if have:
                exact, right, counted = seen_cell_accuracy(pred_img[have], real_img[have], pred_dir[have], real_dir[have],
                                                           np.stack([mask[episodes[j]][k] for j in have]))
                c[m][i] += int(exact.sum())
                c[f"{m}_right"][i] += int(right.sum())
                c[f"{m}_cells"][i] += int(counted.sum())
                c[f"n_{m}"][i] += len(have)

    def curve(self) -> dict:
        c, K = self.c, self.K

        def ratio(a, b):
            return [float(x) / float(y) if y else None for x, y in zip(a, b)]

        curve = {"k": list(range(1, K + 1)), "frame": ratio(c["frame"], c["n"]),
                 "cell": ratio(c["cell"], c["cells"]), "direction": ratio(c["dir"], c["n"]),
                 "n": c["n"].tolist()}
        if self.clean is not None:
            curve.update(frame_known=ratio(c["known"], c["n_known"]), n_known=c["n_known"].tolist())
        for m, mask in self.masks.items():
            if mask is not None:
                curve.update({f"frame_{m}": ratio(c[m], c[f"n_{m}"]), f"cell_{m}": ratio(c[f"{m}_right"], c[f"{m}_cells"]),
                              f"n_{m}": c[f"n_{m}"].tolist(), f"cells_{m}": c[f"{m}_cells"].tolist()})
        return curve


def _compared(layout: StreamLayout, obs: dict, ids: np.ndarray, real: dict, read_cells) -> tuple[tuple, tuple]:
    """Imagined and real observations as ((cells (n, V, V, C), direction (n,)), same for the real ones): MiniGrid's
    symbolic cells; cells read back from imagined frames (``read_cells``, the real direction standing in); or
    the image tokenizer's codes (imagined ids against the codes of the real frames; no direction)."""
    if "image" in obs:
        return (obs["image"], obs["direction"]), (real["image"], np.asarray(real["direction"], np.int64))
    if "image" in real and read_cells is not None:
        d = np.asarray(real["direction"], np.int64)
        return (read_cells(obs[PIXELS]), d), (real["image"], d)
    none = np.zeros(len(ids), np.int64)
    codes = layout.encode_obs(real)
    return (ids[..., None], none), (codes[..., None], none)


def open_loop_order(episodes: list, n: int) -> list[int]:
    """The indices of the episodes open-loop imagination is scored on: the ``n`` longest (eval.open_loop)."""
    return sorted(range(len(episodes)), key=lambda i: -episodes[i].length)[:n]


@torch.no_grad()
def open_loop_accuracy(model, layout: StreamLayout, episodes: list, horizons=(1, 5, 10), mode: str = "tokens",
                       batch: int = 64, precision: str = "fp32", device: str | torch.device = "cpu",
                       novel: list[np.ndarray | None] | None = None, seen: list[np.ndarray | None] | None = None,
                       read_cells=None, shown: list[np.ndarray | None] | None = None) -> dict:
    """Greedy open-loop imagination of held-out episodes under their real actions.

    Each episode starts from its real o_0 and mission; the model imagines every observation from
    its own predictions (never corrected by the truth). For each horizon k, over the episodes of
    length >= k: ``frame`` = the fraction whose imagined o_k equals the real o_k exactly (every
    cell and the direction), ``cell`` = the fraction of the view's cells (object, color, state)
    right, ``direction`` = the fraction of directions right, and ``n``. Returns::

        {"mode": ..., "episodes": N,
         "horizons": {"1": {"frame", "cell", "direction", "n"}, "5": {...}, ...},   # str keys (JSON)
         "curve": {"k": [1..K], "frame": [...], "cell": [...], "direction": [...], "n": [...]}}

    where K = max(horizons) and accuracies are None where n is 0. With ``novel`` (per episode, the
    counts of never-seen objects each o_{t+1} reveals, as ``EnvAdapter.novel_objects`` gives them),
    each horizon also gets ``frame_known`` and ``n_known``: exact frames among the episodes whose
    o_1..o_k reveal nothing that o_0 did not show (the frames a perfect model could imagine).

    With ``seen`` (per episode, (T+1, V, V) bool as ``EnvAdapter.seen_cells`` gives them: the cells
    of each real o_t whose place an earlier real observation showed; None where the adapter cannot
    tell), each horizon also gets the restated figures (`eval.metrics.seen_cell_accuracy`):
    ``frame_seen`` = the fraction of imagined o_k exact on every cell an earlier real observation
    of the episode showed (and the direction), ``cell_seen`` = the fraction of those cells right,
    ``n_seen`` = frames scored and ``cells_seen`` = cells scored. With ``shown`` (the same masks counting
    only the places o_0 showed: ``EnvAdapter.seen_cells(episodes, shown=1)``), the same four figures
    as ``frame_shown``, ``cell_shown``, ``n_shown``, ``cells_shown``: open-loop imagination is given o_0
    alone, so a place that real o_1..o_{k-1} first showed was never shown to the model.

    Pixel worlds (``_compared``): with the symbolic views stored beside the frames (``rgb:`` MiniGrid) and
    ``read_cells`` (frames (N, H, W, 3) -> views (N, V, V, 3), e.g. ``worldloom.vision.cells.CellReader.
    views``), the cells are read back from the imagined frames and scored as above (a frame shows no
    direction: the real one stands in); otherwise a frame's cells are its image tokenizer's codes, the
    imagined ones against the codes of the real frame.
    """
    horizons = sorted({int(k) for k in horizons})
    if not horizons or horizons[0] < 1:
        raise ValueError(f"horizons must be positive step counts, got {horizons}")
    if batch < 1:
        raise ValueError(f"batch must be at least 1, got {batch}")
    model.eval()
    K = horizons[-1]
    tally = _OpenLoopTally(K, novel, seen, shown)
    sim = BatchedWorldModelEnv(model, layout, mode, greedy=True, precision=precision, device=device)
    for i0 in range(0, len(episodes), batch):
        index = [i for i in range(i0, min(i0 + batch, len(episodes))) if episodes[i].length > 0]
        chunk = [episodes[i] for i in index]
        if not chunk:
            continue
        lengths = np.array([ep.length for ep in chunk])
        last = min(K, int(lengths.max()))
        sim.reset([ep.mission for ep in chunk], {k: np.stack([ep.obs[k][0] for ep in chunk]) for k in chunk[0].obs})
        rows = np.arange(len(chunk))  # chunk index of each stream still in the simulator
        for k in range(1, last + 1):
            acts = np.array([chunk[e].action[k - 1] if lengths[e] >= k else 0 for e in rows], np.int64)
            obs, *_ = sim.step(acts)
            live = lengths[rows] >= k
            if live.any():
                real = {f: np.stack([chunk[e].obs[f][k] for e in rows[live]]) for f in chunk[0].obs}
                tally.add(k, [index[e] for e in rows[live]], *_compared(layout, {f: v[live] for f, v in obs.items()},
                                                                          sim.last_ids[live], real, read_cells))
            still = lengths[rows] > k  # these need another step
            if k < last and still.sum() <= 0.75 * len(rows):  # drop finished episodes (one re-prefill)
                keep = np.flatnonzero(still)
                sim.keep(keep)
                rows = rows[keep]

    curve = tally.curve()
    per_k = [key for key in curve if key != "k"]
    at = {str(k): {key: curve[key][k - 1] for key in per_k} for k in horizons}
    return {"mode": mode, "episodes": len(episodes), "horizons": at, "curve": curve}


# ------------------------------------------------------------------------ pictures of a rollout


class RolloutFrame(NamedTuple):
    """One GIF frame: the real and the imagined view (RGB), the action that led to them (None for
    the first, shared observation), whether the imagined observation is exactly the real one
    (every token: for MiniGrid every cell and the direction; for a pixel world every code of the real
    frame's image tokens) and the action's name."""

    real: np.ndarray
    imagined: np.ndarray
    action: int | None
    exact: bool
    action_name: str | None = None


@torch.no_grad()
def imagined_vs_real(run, env_id: str | None = None, seed: int = 0, steps: int = 20, greedy: bool = True,
                     mode: str = "tokens", tile_size: int = 16, precision: str = "fp32",
                     stats: ImagineStats | None = None) -> list[RolloutFrame]:
    """Play the real env with the model's own policy (its action from the REAL stream: greedy, or
    sampled with ``seed``) and imagine the same actions from the same start in the world model
    (``mode`` as `BatchedWorldModelEnv`'s; ``stats`` gets the imagination's counts added).

    Returns 1 + (steps taken) `RolloutFrame`s (real_rgb, imagined_rgb, action, exact, action_name): the
    shared first observation, then the observations after each action (the real episode may end
    sooner). Pictures and action names come from the environment adapter."""
    model, layout = run.model, run.layout
    env_id = env_id or run.cfg.env.id
    adapter = make_adapter(env_id)
    env = adapter.make()
    try:
        raw, _ = env.reset(seed=int(seed))
        fields = {k: v[None] for k, v in adapter.observe(raw).items()}
        mission = adapter.mission(raw)
        policy = StreamRunner(model, layout, precision)
        h = policy.reset([layout.prefix(mission)], layout.encode_obs(fields))
        sim = BatchedWorldModelEnv(model, layout, mode, greedy, seed=seed, precision=precision)
        if stats is not None:
            sim.stats = stats
        sim.reset([mission], fields)
        gen = torch.Generator().manual_seed(int(seed))
        def draw(batched: dict) -> np.ndarray:
            return adapter.render({k: v[0] for k, v in batched.items()}, tile_size)

        first = draw(fields)
        frames = [RolloutFrame(first, first.copy(), None, True)]
        for _ in range(steps):
            logits = policy.logits(h, layout.obs_len)
            action = int(layout.decode_action(sample(logits, 0.0 if greedy else 1.0, generator=gen).cpu().numpy())[0])
            raw, reward, term, trunc, _ = env.step(action)
            real = {k: v[None] for k, v in adapter.observe(raw).items()}
            imag, *_ = sim.step(np.array([action]))
            real_ids = layout.encode_obs(real)[0]
            exact = bool(np.array_equal(sim.last_ids[0], real_ids))  # every token (a pixel world: every code)
            frames.append(RolloutFrame(draw(real), draw(imag), action, exact, adapter.action_names[action]))
            if term or trunc:
                break
            tail = np.concatenate([layout.action_ids([action]), layout.reward_ids([reward]),
                                   layout.done_ids([term], [trunc]), real_ids])
            h = policy.feed(tail[None])[:, -1]
    finally:
        env.close()
    return frames


def _action_name(frame, names: tuple[str, ...]) -> str:
    """The caption name of a frame's action: its own name, else from ``names``, else its number."""
    if len(frame) > 4 and frame[4]:
        return str(frame[4])
    action = int(frame[2])
    return names[action] if 0 <= action < len(names) else str(action)


def _gif_font(px: int):
    """PIL's default font at px pixels (a small bitmap font on a Pillow without FreeType)."""
    from PIL import ImageFont

    try:
        return ImageFont.load_default(size=px)
    except (TypeError, ImportError, OSError):  # Pillow < 10.1, or no FreeType
        return ImageFont.load_default()


def _gif_frame(t: int, frame, names: tuple[str, ...], scale: int, font):
    """One GIF frame: the two views enlarged ``scale`` times by nearest neighbour (cells stay sharp),
    "real" | "imagined" labels over them, a caption under them (step, action, exact or wrong)."""
    from PIL import Image, ImageDraw

    gap, band = 4 * scale, 14 * scale  # pixels between the views; height of the label and caption bands
    real, imag, action = np.asarray(frame[0], np.uint8), np.asarray(frame[1], np.uint8), frame[2]
    exact = bool(frame[3]) if len(frame) > 3 else bool(np.array_equal(real, imag))
    real, imag = (v.repeat(scale, axis=0).repeat(scale, axis=1) for v in (real, imag))  # nearest neighbour
    h = max(real.shape[0], imag.shape[0])
    canvas = np.full((band + h + band, real.shape[1] + gap + imag.shape[1], 3), 255, np.uint8)
    canvas[band : band + real.shape[0], : real.shape[1]] = real
    canvas[band : band + imag.shape[0], real.shape[1] + gap :] = imag
    img = Image.fromarray(canvas)
    draw = ImageDraw.Draw(img)
    pad = 2 * scale
    draw.text((pad, scale), "real", fill=(0, 0, 0), font=font)
    draw.text((real.shape[1] + gap + pad, scale), "imagined", fill=(0, 0, 0), font=font)
    if action is None:
        text, color = f"step {t}: start", (0, 0, 0)
    else:
        text = f"step {t}: {_action_name(frame, names)}, {'exact' if exact else 'wrong'}"
        color = (0, 110, 0) if exact else (190, 0, 0)
    draw.text((pad, band + h + scale), text, fill=color, font=font)
    return img


def write_rollout_gif(frames, path, fps: float = 3, action_names: tuple[str, ...] | None = None, scale: int = 4) -> Path:
    """Frames (`RolloutFrame`s, or (real_rgb, imagined_rgb, action[, exact[, action_name]]) tuples) ->
    an animated GIF: "real" | "imagined" side by side under their labels, over a one-line caption
    (step, action, whether the imagined frame is exactly right; from the pixels when a tuple has no
    ``exact``), the views enlarged ``scale`` times by nearest neighbour (4: a 7x7 view drawn with
    16-pixel tiles becomes 448 pixels wide) and the text drawn at the same scale. The action is
    named by the frame's ``action_name``, else by ``action_names`` (e.g. ``adapter.action_names``),
    else by its number. Written atomically."""
    if not len(frames):
        raise ValueError("write_rollout_gif needs at least one frame")
    if fps <= 0:
        raise ValueError(f"fps must be positive, got {fps}")
    if int(scale) != scale or scale < 1:
        raise ValueError(f"scale must be a positive whole number, got {scale}")
    scale = int(scale)
    names, font = tuple(action_names or ()), _gif_font(11 * scale)
    images = [_gif_frame(t, f, names, scale, font) for t, f in enumerate(frames)]
    buf = io.BytesIO()
    images[0].save(buf, format="GIF", save_all=True, append_images=images[1:], duration=int(round(1000 / fps)), loop=0)
    path = Path(path)
    atomic_write_bytes(path, buf.getvalue())
    return path


# ------------------------------------------------------------------------------- throughput


@torch.no_grad()
def imagination_throughput(model, layout: StreamLayout, first_obs: dict, missions: list[str], batch: int = 64,
                           steps: int = 20, mode: str = "tokens", precision: str = "fp32",
                           device: str | torch.device = "cpu", seed: int = 0, stats: ImagineStats | None = None) -> float:
    """Imagined environment steps per second of `BatchedWorldModelEnv` with ``batch`` streams
    (the given first observations and missions repeated to fill the batch), uniformly random
    actions, greedy decoding. The reset (prefill) is not timed; context rebuilds are. ``stats``
    gets the counts (forwards per step, fast mode's acceptance) added."""
    if batch < 1 or steps < 1:
        raise ValueError("batch and steps must be at least 1")
    idx = np.arange(batch) % len(missions)
    sim = BatchedWorldModelEnv(model, layout, mode, greedy=True, precision=precision, device=device)
    if stats is not None:
        sim.stats = stats
    sim.reset([missions[i] for i in idx], {k: np.asarray(v)[idx] for k, v in first_obs.items()})
    rng = np.random.default_rng(seed)
    actions = rng.integers(layout.n_actions, size=(steps, batch))
    start = time.perf_counter()
    for t in range(steps):
        sim.step(actions[t])
    elapsed = time.perf_counter() - start
    return batch * steps / max(elapsed, 1e-9)
