"""The ppo recipe: a text run tuned by PPO against a reward (`worldloom tune ppo TEXT_RUN ...`).

PPO does not train through the training loop (it samples, scores and updates:
``worldloom.tune.ppo``); this entry lets `load_run`, `eval` and `--resume` read its run folders.
"""

from __future__ import annotations

from pathlib import Path

from ..errors import ConfigError
from ..tune.common import evaluate_tuned
from . import Recipe
from .text import load


def make_task(cfg, run_dir: Path, resuming: bool):
    raise ConfigError("a ppo run is trained by `worldloom tune ppo RUN ...` (or --resume), not by `worldloom train`")


def run(cfg, progress: bool = True, log=print) -> dict:
    return make_task(cfg, cfg.run_dir, False)


def resume(run_dir: Path, overrides: list[str], progress: bool = True, log=print) -> dict:
    from ..tune.ppo import tune_text

    return tune_text(None, overrides, resume=Path(run_dir), progress=progress)


RECIPE = Recipe("ppo", "PPO of a text run against a checker or a reward model", make_task, run, resume, load, evaluate_tuned)
