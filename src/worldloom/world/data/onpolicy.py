"""On-policy episodes labelled by the expert (DAgger): the model acts, the BabyAI bot says what
it would have done.

A policy cloned from demonstrations only ever saw the expert's states; once its own mistakes
take it elsewhere it has never been shown how to recover (behaviour cloning's compounding
error). ``collect_onpolicy`` lets the trained model play training seeds in the real
environment (batched, sampled actions) while a ``BotTeacher`` per environment labels every
state with the bot's action. The episodes keep the actions the model took — the world model
learns their consequences — and carry the bot's actions as ``label``: the policy targets
(worldloom.world.data.packing). The folder has the dataset layout of worldloom.world.data.episodes with a
``train`` split only; ``WorldTask`` adds its episodes to the training set.

The world recipe does this once per run when ``data.onpolicy_episodes`` > 0: train until
``data.onpolicy_at`` of the budget, collect into ``<run>/onpolicy``, train on the aggregate for
the rest of the budget (worldloom.world.pipeline).
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Callable

import numpy as np

from ...errors import DataError
from ...io import write_json
from ..rollout.agent import run_episodes
from .collect import BotTeacher, split_seed
from ..envs import make_adapter
from .episodes import META_FILE, SCHEMA_VERSION, shard_name, write_shard

ONPOLICY_DIR = "onpolicy"


def collect_onpolicy(run, out_dir: str | Path, episodes: int, first: int = 0, envs: int = 100, greedy: bool = False,
                     bot_timeout: float = 2.0, seed: int = 0, shard_size: int = 1000, progress: bool = True,
                     log: Callable[[str], None] = print) -> dict:
    """Play training seeds first .. first+episodes-1 with the run's model, labelled by the bot;
    write them to `out_dir` (a dataset folder with a train split). Returns the meta dict."""
    out_dir = Path(out_dir)
    if (out_dir / META_FILE).exists():
        raise DataError(f"{out_dir} already holds a collected dataset; pick another folder or delete it")
    if not isinstance(episodes, int) or episodes < 1:
        raise DataError(f"on-policy episodes must be an integer >= 1, got {episodes!r}")
    cfg = run.cfg
    adapter = make_adapter(cfg.env.id)
    seeds = [split_seed("train", cfg.data.seed, first + i) for i in range(episodes)]
    t0 = time.perf_counter()
    res = run_episodes(run.model, run.layout, cfg.env.id, seeds, envs=envs, greedy=greedy, seed=seed, record=True,
                       teacher=lambda env: BotTeacher(env, bot_timeout), progress=progress, desc="collect on-policy")
    seconds = time.perf_counter() - t0

    for stale in sorted((out_dir / "train").glob("shard-*.npz")):  # an earlier, interrupted collection
        stale.unlink()
    out_dir.mkdir(parents=True, exist_ok=True)
    eps = [r.episode for r in res]
    shards = []
    for i in range(0, len(eps), shard_size):
        rel = shard_name("train", len(shards))
        write_shard(out_dir / rel, eps[i : i + shard_size])
        shards.append(rel)
    labels = np.concatenate([e.label for e in eps])
    actions = np.concatenate([e.action for e in eps])
    labelled = labels >= 0
    split = {
        "episodes": len(eps), "steps": int(len(actions)), "shards": shards,
        "seeds": {"first": seeds[0], "last": seeds[-1], "tried": len(seeds)},
        "dropped": 0, "dropped_seeds": [],
        "successes": int(sum(e.success for e in eps)), "perturbed": 0, "random_actions": 0,
        "labelled_steps": int(labelled.sum()),
        "agreement": float((labels == actions)[labelled].mean()) if labelled.any() else None,
        "seconds": round(seconds, 3),
    }
    meta = {
        "schema": SCHEMA_VERSION,
        **adapter.describe(),
        "collection": {
            "policy": f"worldloom model of {run.run_dir} (step {run.state.get('step')}, "
                      f"{'greedy' if greedy else 'sampled'}), labels by minigrid.utils.baby_ai_bot.BabyAIBot",
            "seed": cfg.data.seed, "bot_timeout": bot_timeout, "shard_size": shard_size, "seconds": round(seconds, 3),
        },
        "splits": {"train": split},
    }
    write_json(out_dir / META_FILE, meta)
    log(f"on-policy: {len(eps)} episodes ({split['steps']} steps) played by the model at step {run.state.get('step')}, "
        f"success {split['successes'] / len(eps):.1%}; the bot labelled {split['labelled_steps']} steps and the model "
        f"did what it said on {split['agreement'] or 0:.1%} of them ({seconds:.0f} s) -> {out_dir}")
    return meta
