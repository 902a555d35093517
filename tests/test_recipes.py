"""The seams of the training engine: a recipe registered from outside, the Task protocol,
model sizes returned (not written into the caller's config), and compile wrapping what runs."""

from __future__ import annotations

import pytest
import torch
from torch._dynamo.testing import CompileCounter

import worldloom.recipes as recipes
import worldloom.train.loop as loop
from worldloom.config import build_config, read_yaml
from worldloom.errors import ConfigError
from worldloom.recipes.text import TextTask
from worldloom.run import load_run
from worldloom.train import train
from worldloom.train.task import Task
from worldloom.world.task import WorldTask

from conftest import TINY, TINY_WORLD

QUIET = dict(progress=False, log=lambda *a: None)


@pytest.fixture
def toy(monkeypatch):
    monkeypatch.setitem(recipes._MODULES, "toy", "toy_recipe")


def test_a_recipe_is_one_module_and_one_registration(toy, tmp_path):
    cfg = build_config(None, [*TINY, "recipe=toy", f"out_dir={tmp_path}", "name=count", "train.max_steps=60",
                              "train.eval_interval=30", "train.lr=0.01", "train.eval_batches=2"])
    summary = train(cfg, **QUIET)
    assert summary["step"] == 60
    assert summary["val_loss"] < 0.5  # ln 11 = 2.40 at chance: the toy task was learned through the generic loop
    run = load_run(cfg.run_dir)  # the run loader asks the recipe
    assert run.cfg.recipe == "toy" and run.model.cfg.vocab_size == 11
    assert (cfg.run_dir / "counting.txt").is_file()  # Task.save ran


def test_unknown_recipe_is_one_line_with_a_suggestion(tmp_path):
    with pytest.raises(ConfigError, match=r"unknown recipe 'wrld'; did you mean 'world'\?"):
        build_config(None, ["recipe=wrld"])
    assert set(recipes.recipe_names()) >= {"text", "world"}


def test_task_sizes_are_returned_not_written_into_the_callers_config(tiny_cfg):
    cfg = tiny_cfg()
    assert cfg.model.vocab_size == 0
    train(cfg, **QUIET)
    assert cfg.model.vocab_size == 0  # the caller's config is untouched
    saved = read_yaml(cfg.run_dir / "config.yaml")
    assert saved["model"]["vocab_size"] == load_run(cfg.run_dir).tokenizer.vocab_size > 0


def test_builtin_tasks_follow_the_protocol(tiny_cfg, world_dataset, tmp_path):
    text = TextTask(tiny_cfg(), tmp_path, resuming=False)
    assert text.model_sizes() == {"vocab_size": text.tokenizer.vocab_size}
    world_cfg = build_config(None, [*TINY_WORLD, f"data.path={world_dataset}", "stream.parallel_obs=true"])
    world = WorldTask(world_cfg, tmp_path, resuming=False)
    sizes = world.model_sizes()
    assert sizes["vocab_size"] == world.layout.vocab_size and sizes["frame_tokens"] == world.layout.obs_len
    assert world_cfg.model.vocab_size == 0 and world_cfg.model.frame_tokens == 0  # returned, not written
    for task in (text, world):
        assert isinstance(task, Task)
        batch = task.batch(3, torch.Generator().manual_seed(0))
        assert batch["input"].shape == batch["target"].shape == (3, task.cfg.model.context)


def test_compile_wraps_what_training_runs(tiny_cfg, monkeypatch):
    """train.compile=true: every forward of the steps and evaluations goes through the compiled module.
    Fails if the loop calls the uncompiled model (e.g. a loss method that bypasses forward)."""
    counter, calls, real_compile = CompileCounter(), [], torch.compile

    def spy_compile(model, **kw):
        compiled = real_compile(model, backend=counter)
        compiled.register_forward_pre_hook(lambda mod, args: calls.append(mod.training))
        return compiled

    monkeypatch.setattr(loop.torch, "compile", spy_compile)
    cfg = tiny_cfg("train.compile=true", "train.grad_accum=2", "train.max_steps=4", "train.eval_interval=4")
    train(cfg, **QUIET)
    assert counter.frame_count >= 1  # dynamo traced the forward
    assert calls.count(True) == 4 * 2  # every micro-batch of every step called the compiled module
    assert calls.count(False) == cfg.train.eval_batches  # and so did the held-out evaluation
