"""The run folder of an RL run, whatever it plays (a world run's environment, RLHF's prompts).

An RL run folder holds ``rl.yaml`` (the source run and the ``rl.*`` settings), checkpoints
whose ``model.safetensors`` `load_run` reads (``value.safetensors``, the value head, beside
it) and ``metrics.jsonl`` (one row per update). Both RL loops use what is here:

* ``parse_rl_overrides`` splits a command line's ``rl.key=value`` from the rest;
* ``read_rl_file`` reads ``rl.yaml`` back on ``--resume`` (with new ``rl.*`` overrides);
* ``rng_state`` / ``restore_rng`` save and restore the RL generator and torch's global one,
  ``trim_metrics`` drops the rows a kill lost, so that a resumed run continues the same
  sequence as one never stopped;
* ``minibatch_groups`` draws the order of an update's minibatches, ``ppo_epochs`` runs an
  update's epochs over them (gradient steps, the ``target_kl`` early stop, mean loss parts);
* ``run_updates`` is the loop: updates until ``rl.updates`` (or a wall-clock budget), a
  metrics row and a checkpoint per update, a progress bar with the time left.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Callable

import torch
from tqdm import tqdm

from ..checkpoint import latest_checkpoint, load_optimizer, read_state, rng_from_json, rng_to_json
from ..config import from_dict, parse_override, read_yaml, save_yaml, to_dict
from ..errors import CheckpointError, ConfigError
from ..run import METRICS
from ..train.plots import truncate_metrics

RL_FILE = "rl.yaml"
VALUE = "value"  # the checkpoint's value-head file: value.safetensors


def parse_rl_overrides(overrides: list[str], allowed: Callable[[list[str]], bool], allowed_text: str
                       ) -> tuple[dict, list[str]]:
    """`rl.key=value` -> the rl dict; the other overrides whose keys ``allowed`` accepts are returned as
    given; any other key is a ConfigError that names ``allowed_text``."""
    rl, rest = {}, []
    for text in overrides:
        keys, value = parse_override(text)
        if keys[0] == "rl" and len(keys) == 2:
            rl[keys[1]] = value
        elif allowed(keys):
            rest.append(text)
        else:
            raise ConfigError(f"tune ppo takes {allowed_text}; got '{'.'.join(keys)}'")
    return rl, rest


def read_rl_file(run_dir: Path, cfg_cls, rl_overrides: dict):
    """(rl.yaml's content, the RL config with ``rl_overrides`` applied) of an RL run folder; rl.yaml is
    rewritten with the new settings when there are any (e.g. more updates)."""
    run_dir = Path(run_dir)
    if not (run_dir / RL_FILE).is_file():
        raise CheckpointError(f"{run_dir} is not an RL run folder (no {RL_FILE}); start one with `worldloom tune ppo RUN`")
    saved = read_yaml(run_dir / RL_FILE)
    if not isinstance(saved.get("rl"), dict):
        raise CheckpointError(f"{run_dir / RL_FILE} is damaged (no rl: mapping)")
    cfg = from_dict(cfg_cls, {**saved["rl"], **rl_overrides}, prefix="rl.")
    if rl_overrides:
        saved = {**saved, "rl": to_dict(cfg)}
        save_yaml(saved, run_dir / RL_FILE)
    return saved, cfg


def rng_state(gen: torch.Generator) -> dict:
    """The checkpoint state entries of the RL generator and torch's global generator."""
    return {"data_rng": rng_to_json(gen.get_state()), "torch_rng": rng_to_json(torch.get_rng_state())}


def restore_rng(state: dict) -> torch.Generator:
    """The RL generator of a checkpoint state (torch's global generator is restored too)."""
    gen = torch.Generator()
    gen.set_state(rng_from_json(state["data_rng"]))
    torch.set_rng_state(rng_from_json(state["torch_rng"]))
    return gen


def resume_optimizer(opt: torch.optim.Optimizer, ckpt: Path, state: dict, lr: float) -> None:
    """AdamW moments back from a checkpoint, at the (possibly overridden) learning rate."""
    load_optimizer(opt, ckpt, state)
    for g in opt.param_groups:
        g["lr"] = lr


def trim_metrics(path: Path, upto: int) -> None:
    """Drop the rows of updates after the checkpoint (a kill lost them; they are played again)."""
    truncate_metrics(path, upto, key="update")


def minibatch_groups(sizes: list[int], size: int, gen: torch.Generator) -> list[list[int]]:
    """Indices of the items (windows, sequences) in a random order, grouped until each group holds at
    least ``size`` samples (``sizes[i]``: the samples of item i); the last group may hold fewer."""
    order = torch.randperm(len(sizes), generator=gen).tolist()
    groups, cur, n = [], [], 0
    for i in order:
        cur.append(i)
        n += sizes[i]
        if n >= size:
            groups.append(cur)
            cur, n = [], 0
    if cur:
        groups.append(cur)
    return groups


def ppo_epochs(groups: Callable[[], list], minibatch_loss: Callable[[object], tuple[torch.Tensor, dict]],
               opt: torch.optim.Optimizer, cfg, value_only: bool) -> dict:
    """The PPO epochs of one update: ``groups()`` draws an epoch's minibatches, ``minibatch_loss(group)``
    gives (loss, its parts incl. ``approx_kl``). Stops once approx_kl passes ``cfg.target_kl`` (not in
    the value warm-up). Returns the mean of each part over the minibatches that ran."""
    params = [p for g in opt.param_groups for p in g["params"]]
    sums, steps, stopped = {}, 0, False
    for _ in range(cfg.epochs):
        for group in groups():
            total, parts = minibatch_loss(group)
            opt.zero_grad(set_to_none=True)
            total.backward()
            if cfg.grad_clip > 0:
                torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
            opt.step()
            for k, v in parts.items():
                sums[k] = sums.get(k, 0.0) + v
            steps += 1
            if not value_only and cfg.target_kl > 0 and parts["approx_kl"] > cfg.target_kl:
                stopped = True
                break
        if stopped:
            break
    return {**{k: v / max(steps, 1) for k, v in sums.items()}, "minibatches": steps, "early_stop": stopped}


def run_updates(tu, one_update: Callable[[], dict], save: Callable[[], None], postfix: Callable[[dict], dict],
                line: Callable[[dict], str], progress: bool = True, log=print, max_seconds: float = 0.0) -> dict:
    """Updates until ``tu.cfg.updates`` (or, with ``max_seconds`` > 0, until the run's elapsed time passes
    it); each appends its metrics row (plus ``elapsed``) to metrics.jsonl; a checkpoint every
    ``tu.cfg.checkpoint_every`` updates and at the end. ``tu`` carries ``run_dir``, ``cfg``, ``update``
    and ``elapsed``. Returns the last row (empty when no update ran)."""
    cfg = tu.cfg
    fmt = "{desc} {n_fmt}/{total_fmt}|{bar}| [{elapsed}<{remaining}{postfix}]"
    bar = tqdm(total=cfg.updates, initial=min(tu.update, cfg.updates), desc="ppo", bar_format=fmt,
               disable=not progress or None, dynamic_ncols=True)
    row = {}
    try:
        while tu.update < cfg.updates and not (max_seconds > 0 and tu.elapsed >= max_seconds):
            t0 = time.perf_counter()
            row = one_update()
            tu.elapsed += time.perf_counter() - t0
            row["elapsed"] = round(tu.elapsed, 2)
            with open(Path(tu.run_dir) / METRICS, "a") as f:
                f.write(json.dumps(row) + "\n")
            if tu.update % cfg.checkpoint_every == 0 or tu.update == cfg.updates:
                save()
            bar.update(1)
            bar.set_postfix(**postfix(row))
            if not progress:
                log(line(row))
    except KeyboardInterrupt:
        bar.close()
        raise CheckpointError(f"interrupted at update {tu.update}; continue with `worldloom tune ppo --resume {tu.run_dir}`") from None
    bar.close()
    ckpt = latest_checkpoint(tu.run_dir)
    if ckpt is None or read_state(ckpt)["step"] != tu.update:
        save()
    return row
