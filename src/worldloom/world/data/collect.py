"""Collect episode datasets by playing BabyAI levels with minigrid's ``BabyAIBot``.

Seeds. Episode i of a split is played on environment seed ``split_seed(split, base_seed, i)``:

    train: base_seed + 0         + i   (TRAIN_SEED_BASE)
    val:   base_seed + 1_000_000 + i   (VAL_SEED_BASE)
    eval:  base_seed + 2_000_000 + i   (EVAL_SEED_BASE, reserved for evaluating in the real env)
    rl:    base_seed + 3_000_000 + i   (RL_SEED_BASE, episodes played by `worldloom tune ppo`)

so the splits never share a level layout (a split holds fewer than 1,000,000 seeds).

Perturbation. Each episode has its own random stream, ``np.random.default_rng([base_seed,
env_seed])``. It decides whether the episode is perturbed (probability ``perturbed_fraction``)
and, in a perturbed episode, replaces the bot's action at each step with probability
``epsilon`` by a uniformly random action (``random_action=True``); the bot is told the action
actually taken and re-plans from there. The same seeds therefore give the same data whatever
the number of workers or the order in which they finish.

Random play. ``policy="random"`` (environments without a bot: Crafter, Atari) plays uniformly
random actions from each episode's own stream, every one marked ``random_action`` (no policy
labels: the data teaches a world model, not a policy); ``max_steps`` > 0 cuts (truncates) every
episode after that many steps, whoever plays.

Dropped episodes. On a few seeds the bot loops forever inside ``replan()`` or raises (e.g. an
assertion after a random action, or ``DisappearedBoxError`` after a random toggle opened a
box). Every ``replan()`` is bounded by ``bot_timeout`` seconds (SIGALRM, in the main thread of
each worker); such episodes are dropped and counted, and collection goes on with the next
seeds. Seeds are tried in order and the split keeps the first ``n`` seeds that were not
dropped, so the result is again independent of the worker count (a bot that is merely slow,
near ``bot_timeout``, on a loaded machine is the one source of non-determinism).

Parallelism. ``workers > 1`` runs chunks of seeds in a ``ProcessPoolExecutor`` with the
"spawn" start method (scripts that call ``collect_dataset`` need the usual
``if __name__ == "__main__":`` guard); every worker reuses one environment. Under torchrun
(``world > 1``) each chunk is dealt over the ranks, each with its own ``workers``, and rank 0
writes the folder: the same data as one process. Shards are
written as soon as their episodes are known, and ``meta.json`` is written last.
"""

from __future__ import annotations

import math
import multiprocessing
import signal
import threading
import time
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
from tqdm.auto import tqdm

from ...errors import DataError, EnvError
from ...io import write_json
from ..envs import EnvAdapter, make_adapter
from ..envs.minigrid import BabyAIBot  # None without minigrid
from .episodes import META_FILE, SCHEMA_VERSION, Episode, shard_name, write_shard

TRAIN_SEED_BASE = 0
VAL_SEED_BASE = 1_000_000
EVAL_SEED_BASE = 2_000_000
RL_SEED_BASE = 3_000_000  # reinforcement learning in the real environment (worldloom.world.rl)
SEED_BASES = {"train": TRAIN_SEED_BASE, "val": VAL_SEED_BASE, "eval": EVAL_SEED_BASE, "rl": RL_SEED_BASE}
SEEDS_PER_SPLIT = 1_000_000


def split_seed(split: str, base_seed: int, i: int) -> int:
    """The environment seed of episode i of a split ("train", "val", "eval" or "rl")."""
    if split not in SEED_BASES:
        raise ValueError(f"unknown split {split!r}; one of {', '.join(SEED_BASES)}")
    if not 0 <= i < SEEDS_PER_SPLIT:
        raise ValueError(f"episode index {i} outside 0..{SEEDS_PER_SPLIT - 1}")
    return base_seed + SEED_BASES[split] + i


# ------------------------------------------------------------------------ one episode


class _BotTimeout(BaseException):
    """Raised by the SIGALRM handler when one replan() takes longer than bot_timeout.

    A BaseException, so that no ``except Exception`` inside the bot can swallow it.
    """


def _on_alarm(signum, frame):
    raise _BotTimeout()


@contextmanager
def _alarm_handler(enabled: bool):
    """Install the SIGALRM handler for the block (main thread only), restoring the old one."""
    if not enabled:
        yield False
        return
    old = signal.signal(signal.SIGALRM, _on_alarm)
    try:
        yield True
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)


@dataclass
class _Dropped:
    seed: int
    reason: str  # "timeout" or the exception's class name


@dataclass
class _Settings:
    env_id: str
    base_seed: int
    perturbed_fraction: float
    epsilon: float
    bot_timeout: float
    policy: str = "bot"  # bot | random (uniform actions, every one marked random: no policy labels)
    max_steps: int = 0  # 0: the environment's own limit


class _Collector:
    """Plays episodes with the bot on one reused environment."""

    def __init__(self, settings: _Settings):
        self.settings = settings
        self.adapter: EnvAdapter = make_adapter(settings.env_id)
        self.env = self.adapter.make()

    def run(self, seeds: list[int]) -> list[Episode | _Dropped]:
        return [self.episode(s) for s in seeds]

    def episode(self, env_seed: int) -> Episode | _Dropped:
        """One episode, or _Dropped if the bot timed out or raised."""
        st, adapter, env = self.settings, self.adapter, self.env
        rng = np.random.default_rng([st.base_seed, env_seed])
        perturbed = bool(rng.random() < st.perturbed_fraction) and st.epsilon > 0
        epsilon = st.epsilon if perturbed else 0.0

        obs, _ = env.reset(seed=env_seed)
        mission = adapter.mission(obs)
        frames = [adapter.observe(obs)]
        actions, rewards, randoms = [], [], []
        terminated = truncated = False
        if st.policy == "random":
            perturbed, epsilon = True, 1.0
        try:
            bot = BotTeacher(env, st.bot_timeout) if st.policy == "bot" else None
            while not (terminated or truncated):
                suggested = bot.label() if bot is not None else -1
                if bot is not None and bot.failed:
                    return _Dropped(env_seed, bot.failed)
                if perturbed and rng.random() < epsilon:
                    action, is_random = int(rng.integers(adapter.n_actions)), True
                else:
                    action, is_random = suggested, False
                if bot is not None:
                    bot.taken(action)  # the bot re-plans from the action actually taken
                obs, reward, terminated, truncated, _ = env.step(action)
                truncated = truncated or (st.max_steps > 0 and len(actions) + 1 >= st.max_steps)
                frames.append(adapter.observe(obs))
                actions.append(action)
                rewards.append(reward)
                randoms.append(is_random)
        except Exception as e:  # building the bot, or the environment itself
            return _Dropped(env_seed, type(e).__name__)
        return Episode(
            seed=env_seed,
            mission=mission,
            obs={k: np.stack([f[k] for f in frames]) for k in adapter.obs_fields},
            action=np.array(actions, dtype=np.int64),
            reward=np.array(rewards, dtype=np.float32),
            terminated=terminated,
            truncated=truncated,
            random_action=np.array(randoms, dtype=bool),
            epsilon=epsilon,
        )


class BotTeacher:
    """The BabyAI bot on one environment: the collector's expert, and the labeller of another
    policy's steps (DAgger).

    Build it right after ``env.reset``; ``label()`` is the bot's action in the current state,
    ``taken(action)`` tells it what was done instead, so that it re-plans from there (as in
    perturbed collection). A ``replan()`` that raises or exceeds ``timeout`` seconds (bounded
    with SIGALRM in the main thread) ends the labels of the episode: -1 from then on.
    """

    def __init__(self, env, timeout: float = 2.0):
        if BabyAIBot is None:
            raise EnvError("the BabyAI bot needs minigrid: pip install minigrid")
        self.bot = BabyAIBot(env.unwrapped)
        self.timeout = timeout
        self.can_time = timeout > 0 and hasattr(signal, "setitimer") and threading.current_thread() is threading.main_thread()
        self.suggested: int | None = None
        self.told: int | None = None
        self.failed: str | None = None  # why the labels ended (timeout / the exception's class name)

    def label(self) -> int:
        if self.failed:
            return -1
        with _alarm_handler(self.can_time) as timed:
            try:
                if timed:
                    signal.setitimer(signal.ITIMER_REAL, self.timeout)
                self.suggested = int(self.bot.replan(self.told))
                if timed:
                    signal.setitimer(signal.ITIMER_REAL, 0)
            except _BotTimeout:
                self.failed = "timeout"
            except Exception as e:  # the bot's assertions, DisappearedBoxError, ...
                self.failed = type(e).__name__
        if self.failed:
            self.suggested = None
            return -1
        return self.suggested

    def taken(self, action: int) -> None:
        self.told = None if action == self.suggested else int(action)


# A worker process's collector, built once by the pool initializer.
_WORKER: _Collector | None = None


def _init_worker(settings: _Settings) -> None:
    global _WORKER
    _WORKER = _Collector(settings)


def _run_chunk(seeds: list[int]) -> list[Episode | _Dropped]:
    return _WORKER.run(seeds)


class _InlineExecutor:
    """The executor interface, running each chunk at submit time (workers == 1)."""

    def __init__(self, settings: _Settings):
        self.collector = _Collector(settings)

    def submit(self, fn, seeds):
        fut: Future = Future()
        fut.set_result(self.collector.run(seeds))
        return fut

    def shutdown(self, wait=True, cancel_futures=False):
        pass


class _RankExecutor:
    """The executor interface over the ranks of a torchrun job. Rank 0 runs ``_collect_split`` and
    ``submit`` deals each chunk's seeds round-robin to the ranks; every rank plays its part on its
    own local executor (``workers`` processes or inline) and rank 0 gathers the episodes. The other
    ranks ``follow`` until rank 0's ``shutdown``. Each episode depends only on its seed, so the
    data are those of one process."""

    def __init__(self, local, workers: int):
        import torch.distributed as torch_dist

        self.dist, self.local, self.workers = torch_dist, local, workers
        self.rank, self.world = torch_dist.get_rank(), torch_dist.get_world_size()

    def _play(self, seeds: list[int]) -> list[Episode | _Dropped]:
        futures = [self.local.submit(_run_chunk, seeds[k::self.workers]) for k in range(self.workers) if seeds[k::self.workers]]
        return [r for f in futures for r in f.result()]

    def submit(self, fn, seeds):
        parts = [[seeds[r::self.world] for r in range(self.world)]]
        self.dist.broadcast_object_list(parts, src=0)
        gathered = [None] * self.world
        self.dist.gather_object(self._play(parts[0][0]), gathered, dst=0)
        fut: Future = Future()
        fut.set_result([r for part in gathered for r in part])
        return fut

    def follow(self) -> None:
        while True:
            parts = [None]
            self.dist.broadcast_object_list(parts, src=0)
            if parts[0] is None:
                return
            self.dist.gather_object(self._play(parts[0][self.rank]), None, dst=0)

    def shutdown(self, wait=True, cancel_futures=False):
        if self.rank == 0:
            self.dist.broadcast_object_list([None], src=0)
        self.local.shutdown(wait=wait, cancel_futures=cancel_futures)


# ----------------------------------------------------------------------------- a split


@dataclass
class _SplitStats:
    episodes: int = 0
    steps: int = 0
    successes: int = 0
    perturbed: int = 0
    random_actions: int = 0
    seeds_tried: int = 0

    def add(self, ep: Episode) -> None:
        self.episodes += 1
        self.steps += ep.length
        self.successes += ep.success
        self.perturbed += ep.perturbed
        self.random_actions += int(ep.random_action.sum())


def _collect_split(executor, split: str, n: int, base_seed: int, chunk: int, max_pending: int,
                   out_dir: Path, shard_size: int, progress: bool) -> dict:
    """Play seeds of `split` in order until n episodes were kept; write their shards."""
    t0 = time.perf_counter()
    stats = _SplitStats()
    dropped: list[_Dropped] = []
    shards: list[str] = []
    buffer: list[Episode] = []
    results: dict[int, Episode | _Dropped] = {}  # finished, not yet consumed in seed order
    pending: dict[Future, int] = {}  # future -> number of seeds in it
    next_i = 0  # index of the next seed to submit
    emit_i = 0  # index of the next seed to consume in order
    kept = 0  # episodes (not dropped) among finished seeds
    in_flight = 0  # seeds submitted and not finished
    n_dropped = 0

    def flush(final: bool = False) -> None:
        while len(buffer) >= shard_size or (final and buffer):
            rel = shard_name(split, len(shards))
            write_shard(out_dir / rel, buffer[:shard_size])
            shards.append(rel)
            del buffer[:shard_size]

    bar = tqdm(total=n, desc=f"collect {split}", unit="ep", disable=not progress, dynamic_ncols=True)
    try:
        while True:
            # Submit just enough seeds to reach n episodes if none of them is dropped.
            while len(pending) < max_pending and kept + in_flight < n:
                count = min(chunk, n - kept - in_flight)
                if next_i + count > SEEDS_PER_SPLIT:
                    raise DataError(
                        f"split {split} ran out of seeds ({len(dropped)} dropped episodes); "
                        "collect fewer episodes or raise --bot-timeout"
                    )
                seeds = [split_seed(split, base_seed, next_i + k) for k in range(count)]
                pending[executor.submit(_run_chunk, seeds)] = count
                next_i += count
                in_flight += count
            if not pending:
                break
            done, _ = wait(list(pending), return_when=FIRST_COMPLETED)
            for fut in done:
                in_flight -= pending.pop(fut)
                for r in fut.result():
                    results[r.seed] = r
                    if isinstance(r, Episode):
                        kept += 1
                        bar.update(1)
                    else:
                        n_dropped += 1
                        bar.set_postfix(dropped=n_dropped)
            # Consume finished results in seed order.
            while emit_i < next_i and split_seed(split, base_seed, emit_i) in results:
                r = results.pop(split_seed(split, base_seed, emit_i))
                emit_i += 1
                if isinstance(r, Episode):
                    stats.add(r)
                    buffer.append(r)
                else:
                    dropped.append(r)
            flush()
        flush(final=True)
    finally:
        bar.close()
    assert stats.episodes == n and not results, "collection bookkeeping is off"
    stats.seeds_tried = next_i
    first = split_seed(split, base_seed, 0)
    return {
        "episodes": stats.episodes,
        "steps": stats.steps,
        "shards": shards,
        "seeds": {"first": first, "last": first + next_i - 1, "tried": next_i} if next_i else
                 {"first": first, "last": None, "tried": 0},
        "dropped": len(dropped),
        "dropped_seeds": [{"seed": d.seed, "reason": d.reason} for d in dropped],
        "successes": stats.successes,
        "perturbed": stats.perturbed,
        "random_actions": stats.random_actions,
        "seconds": round(time.perf_counter() - t0, 3),
    }


# ------------------------------------------------------------------------------ public


def _check_args(train_episodes, val_episodes, seed, perturbed_fraction, epsilon, workers, bot_timeout, shard_size):
    def need(ok: bool, msg: str) -> None:
        if not ok:
            raise DataError(msg)

    need(isinstance(train_episodes, int) and 1 <= train_episodes < SEEDS_PER_SPLIT,
         f"train episodes must be an integer in 1..{SEEDS_PER_SPLIT - 1}, got {train_episodes!r}")
    need(isinstance(val_episodes, int) and 0 <= val_episodes < SEEDS_PER_SPLIT,
         f"val episodes must be an integer in 0..{SEEDS_PER_SPLIT - 1}, got {val_episodes!r}")
    need(isinstance(seed, int) and seed >= 0, f"seed must be a non-negative integer, got {seed!r}")
    need(0.0 <= perturbed_fraction <= 1.0, f"perturbed fraction must be in [0, 1], got {perturbed_fraction!r}")
    need(0.0 <= epsilon <= 1.0, f"epsilon must be in [0, 1], got {epsilon!r}")
    need(isinstance(workers, int) and workers >= 1, f"workers must be an integer >= 1, got {workers!r}")
    need(bot_timeout > 0, f"bot timeout must be > 0 seconds, got {bot_timeout!r}")
    need(isinstance(shard_size, int) and shard_size >= 1, f"shard size must be an integer >= 1, got {shard_size!r}")


def _executor(settings: _Settings, workers: int, world: int):
    if workers > 1:
        local = ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn"),
                                    initializer=_init_worker, initargs=(settings,))
    else:
        local = _InlineExecutor(settings)
    return _RankExecutor(local, workers) if world > 1 else local


def collect_dataset(
    out_dir: str | Path,
    env_id: str,
    train_episodes: int,
    val_episodes: int,
    seed: int = 0,
    perturbed_fraction: float = 0.5,
    epsilon: float = 0.2,
    workers: int = 2,
    bot_timeout: float = 2.0,
    shard_size: int = 1000,
    progress: bool = True,
    log: Callable[[str], None] = print,
    world: int = 1,
    policy: str = "bot",
    max_steps: int = 0,
) -> dict:
    """Collect train and val episodes of a BabyAI level into `out_dir`; returns the meta dict.

    See the module docstring for seeds, perturbation and dropped episodes, and
    ``docs/episodes.md`` for the folder layout and meta.json. ``world > 1``: every rank of the
    (initialised) process group calls this; the seeds are spread over the ranks (``_RankExecutor``),
    rank 0 writes the folder and returns the meta dict, the other ranks return ``{}``.
    """
    out_dir = Path(out_dir)
    _check_args(train_episodes, val_episodes, seed, perturbed_fraction, epsilon, workers, bot_timeout, shard_size)
    if (out_dir / META_FILE).exists():
        raise DataError(f"{out_dir} already holds a collected dataset; pick another --out or delete it")
    if out_dir.exists() and not out_dir.is_dir():
        raise DataError(f"output path {out_dir} is a file; pick another --out")

    adapter = make_adapter(env_id)
    if policy == "bot":
        probe = adapter.make()
        try:
            probe.reset(seed=seed)
            if not hasattr(probe.unwrapped, "instrs"):
                raise EnvError(f"the BabyAI bot plays BabyAI-* levels only; {env_id!r} has no BabyAI instructions "
                               "(collect with data.policy=random)")
        finally:
            probe.close()

    settings = _Settings(env_id, seed, float(perturbed_fraction), float(epsilon), float(bot_timeout), policy, int(max_steps))
    t0 = time.perf_counter()
    executor = _executor(settings, workers, world)
    if isinstance(executor, _RankExecutor) and executor.rank > 0:
        try:
            executor.follow()
        finally:
            executor.shutdown()
        return {}
    # Shards of an earlier, interrupted collection (no meta.json) would be stale: remove them.
    for split in ("train", "val"):
        for stale in sorted((out_dir / split).glob("shard-*.npz")):
            stale.unlink()
    out_dir.mkdir(parents=True, exist_ok=True)
    splits = {}
    try:
        for split, n in (("train", train_episodes), ("val", val_episodes)):
            least = 1 if world == 1 else workers * world  # a chunk is played at once by every rank's workers
            chunk = max(least, min(64, math.ceil(n / (workers * world * 8))))
            splits[split] = _collect_split(executor, split, n, seed, chunk, 2 * workers,
                                           out_dir, shard_size, progress)
    finally:
        executor.shutdown(wait=True, cancel_futures=True)
    seconds = time.perf_counter() - t0

    meta = {
        "schema": SCHEMA_VERSION,
        **adapter.describe(),
        "collection": {
            "policy": "minigrid.utils.baby_ai_bot.BabyAIBot" if policy == "bot" else "random",
            "max_steps": int(max_steps),
            "seed": seed,
            "seed_bases": dict(SEED_BASES),
            "perturbed_fraction": settings.perturbed_fraction,
            "epsilon": settings.epsilon,
            "bot_timeout": settings.bot_timeout,
            "shard_size": shard_size,
            "seconds": round(seconds, 3),
        },
        "splits": splits,
    }
    write_json(out_dir / META_FILE, meta)

    tot = {k: sum(s[k] for s in splits.values()) for k in ("episodes", "steps", "successes", "perturbed", "dropped")}
    log(
        f"collected {splits['train']['episodes']} train + {splits['val']['episodes']} val episodes of {env_id} "
        f"({tot['steps']} steps, {tot['successes']} successes, {tot['perturbed']} perturbed, "
        f"{tot['dropped']} dropped) in {seconds:.1f} s ({tot['episodes'] / max(seconds, 1e-9):.0f} episodes/s) -> {out_dir}"
    )
    return meta
