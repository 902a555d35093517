"""Recipes by name: ``recipe: text`` or ``recipe: world`` in a config picks one here.

A recipe (``Recipe``) gives everything that differs between kinds of run:

- ``make_task(cfg, run_dir, resuming)``: its training task (``worldloom.train.task.Task``);
- ``run(cfg, progress, log)``: its pipeline behind `worldloom train` (the text recipe only
  trains; the world recipe collects, trains, evaluates and writes a report);
- ``resume(run_dir, overrides, progress, log)``: behind `worldloom train --resume`;
- ``load(run_dir)``: the run loader's part: ``(vocab_size, {"tokenizer": ...} or {"layout": ...})``;
- ``evaluate(args, run)``: behind `worldloom eval RUN` (prints, returns an exit status);
- ``objectives``: the ``train.objective`` values it trains (default: next-token only);
- ``model_fields``: the model config fields its task sets from the data (default: vocab_size);
- ``world``: its runs are world runs (world, talk): a stream layout, played by `tune ppo`;
- ``spoken``: its runs can hear their missions (``stream.spoken``; the world recipe);
- ``build_model(cfg)``: the module it trains when that is not an ``LWM`` (the image tokenizer's
  autoencoder); its ``load`` then returns ``(None, {})``.

A new recipe is one module that defines ``RECIPE`` plus one line in ``_MODULES``. Nothing outside
this registry compares recipe names. Modules are imported on first use, so reading a config
imports no torch.
"""

from __future__ import annotations

import difflib
import importlib
from dataclasses import dataclass
from typing import Callable

from ..errors import ConfigError

_MODULES = {  # recipe name -> the module that defines its RECIPE
    "text": "worldloom.recipes.text",
    "world": "worldloom.recipes.world",
    "sft": "worldloom.recipes.sft",
    "dpo": "worldloom.recipes.dpo",
    "orpo": "worldloom.recipes.orpo",
    "reward": "worldloom.recipes.reward",
    "ppo": "worldloom.recipes.ppo",
    "medusa": "worldloom.recipes.medusa",
    "draft": "worldloom.recipes.draft",
    "ternary": "worldloom.recipes.ternary",
    "image-tokenizer": "worldloom.recipes.image_tokenizer",
    "talk": "worldloom.recipes.talk",
    "bind": "worldloom.recipes.bind",
    "audio-tokenizer": "worldloom.recipes.audio_tokenizer",
    "listen": "worldloom.recipes.listen",
}


@dataclass(frozen=True)
class Recipe:
    name: str
    description: str
    make_task: Callable
    run: Callable
    resume: Callable
    load: Callable
    evaluate: Callable
    objectives: tuple[str, ...] = ("next",)  # the train.objective values its task trains on
    model_fields: tuple[str, ...] = ("vocab_size",)  # the ModelConfig fields its task sets (Task.model_sizes)
    build_model: Callable | None = None  # cfg -> the module it trains, when it is not an LWM (an image autoencoder)
    world: bool = False  # its runs are world runs (a stream layout; `tune ppo` plays them; text-only commands refuse them)
    vision_prefix: bool = False  # its views can be read as a vision prefix (talk.view=prefix, prefix.*)
    spoken: bool = False  # its missions can be spoken (stream.spoken > 0: audio tokens in the stream, worldloom.audio.spoken)


def prepare_then_train(cfg, prepare, save, folder: str, progress: bool = True, log=print) -> dict:
    """A non-LM recipe's `worldloom train`: make its data first (with a progress bar; ``prepare(cfg, run_dir,
    progress)`` -> {split: data}, each saved by ``save(path, data)`` as ``<run>/<folder>/<split>.npz``) unless the
    run has a checkpoint, then train."""
    from pathlib import Path

    from ..checkpoint import latest_checkpoint
    from ..train import train

    if progress and latest_checkpoint(cfg.run_dir) is None:
        for split, data in prepare(cfg, cfg.run_dir, progress).items():
            save(Path(cfg.run_dir) / folder / f"{split}.npz", data)
    return train(cfg, progress=progress, log=log)


def resume_training(run_dir, overrides: list[str], progress: bool = True, log=print) -> dict:
    """`worldloom train --resume` of a recipe whose pipeline is its training alone."""
    from pathlib import Path

    from ..train import train

    return train(resume=Path(run_dir), overrides=overrides, progress=progress, log=log)


def tokenizer_stage(where, given: str, key: str, train_command: str, recipe, stage_config, started: str,
                    progress: bool = True, log=print) -> None:
    """A run's learned tokenizer before it trains: ``given`` (the ``key`` setting) names one, which must be a
    folder; else the stage trains one into ``where`` (``recipe.run(stage_config())``, ``started`` logged), or
    finishes it if a kill interrupted it."""
    from ..checkpoint import latest_checkpoint
    from ..errors import ConfigError

    if given:
        if not where.is_dir():
            raise ConfigError(f"{key}={where} is not a folder; give a `{train_command}` run folder, or leave it empty "
                              "to train one first")
    elif latest_checkpoint(where) is not None:
        log(f"tokenizer stage: finishing {where}")
        recipe.RECIPE.resume(where, [], progress=progress, log=log)
    else:
        log(f"tokenizer stage: {started} in {where}")
        recipe.run(stage_config(), progress=progress, log=log)


def load_nothing(run_dir) -> tuple[None, dict]:
    """The run loader's part of a recipe that builds its own model (``build_model``): no tokenizer, no layout."""
    return None, {}


def recipe_names() -> list[str]:
    return list(_MODULES)


def check_recipe(name: str) -> None:
    """ConfigError (with the closest name) unless ``name`` is a registered recipe."""
    if name not in _MODULES:
        close = difflib.get_close_matches(name, list(_MODULES), n=1)
        hint = f"; did you mean '{close[0]}'?" if close else ""
        raise ConfigError(f"unknown recipe {name!r}{hint} available: {', '.join(_MODULES)}")


def get_recipe(name: str) -> Recipe:
    check_recipe(name)
    recipe = importlib.import_module(_MODULES[name]).RECIPE
    if recipe.name != name:  # pragma: no cover - a registration mistake
        raise RuntimeError(f"{_MODULES[name]} defines recipe {recipe.name!r}, registered as {name!r}")
    return recipe
