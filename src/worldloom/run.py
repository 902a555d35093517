"""A run folder: its resolved config, tokenizer, checkpoints, metrics and plots.

``load_run`` is how every verb after `train` (generate, eval, export, imagine) gets a model
back: a text run comes with its text tokenizer, a world run with its stream layout.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from .checkpoint import latest_checkpoint, load_model_weights, read_state
from .config import RunConfig, from_dict, read_yaml
from .errors import CheckpointError, ConfigError
from .model import LWM

CONFIG = "config.yaml"
TOKENIZER_DIR = "tokenizer"
METRICS = "metrics.jsonl"


@dataclass
class LoadedRun:
    cfg: RunConfig
    model: LWM
    tokenizer: object  # text runs: their TextTokenizer
    state: dict
    checkpoint: Path
    layout: object = None  # world runs: their StreamLayout
    run_dir: Path | None = None

    @property
    def is_world(self) -> bool:
        return self.layout is not None


def read_run_config(run_dir: Path) -> RunConfig:
    run_dir = Path(run_dir)
    if not run_dir.exists():
        raise CheckpointError(f"run folder not found: {run_dir}")
    if not (run_dir / CONFIG).is_file():
        raise CheckpointError(f"{run_dir} is not a worldloom run folder (no {CONFIG})")
    try:
        return from_dict(RunConfig, read_yaml(run_dir / CONFIG))
    except ConfigError as e:
        raise CheckpointError(f"{run_dir / CONFIG} is not a valid run config: {e}") from None


def load_run(run_dir: Path, device: str | torch.device = "cpu", any_model: bool = False) -> LoadedRun:
    """A run folder's config, model (latest checkpoint) and tokenizer or stream layout. A run whose
    recipe trains another kind of module (an image tokenizer) is refused unless ``any_model``."""
    run_dir = Path(run_dir)
    cfg = read_run_config(run_dir)
    ckpt = latest_checkpoint(run_dir)
    if ckpt is None:
        raise CheckpointError(f"run folder {run_dir} holds no checkpoint yet (train it first)")
    state = read_state(ckpt)
    from .recipes import get_recipe

    recipe = get_recipe(cfg.recipe)
    vocab, parts = recipe.load(run_dir)  # the text tokenizer, or the world stream layout
    if recipe.build_model is not None:  # not a language model (an image tokenizer's autoencoder)
        if not any_model:
            raise CheckpointError(f"{run_dir} is a {cfg.recipe} run ({recipe.description}), not a language or world "
                                  f"model; `worldloom eval {run_dir}` reports on it")
        model = recipe.build_model(cfg)
        load_model_weights(model, ckpt)
        return LoadedRun(cfg, model.to(device).eval(), None, state, ckpt, None, run_dir)
    if vocab != cfg.model.vocab_size:
        raise CheckpointError(f"tokenizer in {run_dir} has {vocab} tokens but the model config says {cfg.model.vocab_size}")
    model = LWM(cfg.model)
    if cfg.recipe == "medusa":  # a Medusa run's checkpoint holds its heads: the rest is its (frozen) base's
        from .adapters.medusa import prepare_medusa

        prepare_medusa(model, cfg, run_dir)
    elif cfg.tune.base and cfg.lora.rank:  # a LoRA run's checkpoint holds its adapters: the rest is its base's
        from .tune.base import prepare_tuned

        prepare_tuned(model, cfg, run_dir)
    if cfg.talk.view == "prefix":  # a talk run's vision prefix: encoder + projector, saved with the model
        from .talk.prefix import attach_prefix

        attach_prefix(model, cfg, parts["layout"].obs.view)
    if cfg.quant.bits:  # int8 or ternary layers in place of the backbone's nn.Linear
        from .quant import prepare_loaded

        prepare_loaded(model, cfg, state)
    load_model_weights(model, ckpt)
    model.to(device).eval()
    return LoadedRun(cfg, model, parts.get("tokenizer"), state, ckpt, parts.get("layout"), run_dir)


def load_world_run(run_dir: Path, device: str | torch.device = "cpu") -> LoadedRun:
    """load_run, for verbs that need a world model (eval of a world run, imagine)."""
    run = load_run(run_dir, device)
    if not run.is_world:
        raise CheckpointError(f"{run_dir} holds a text model (recipe {run.cfg.recipe}), not a world model; "
                              "train one with `worldloom train babyai`")
    return run
