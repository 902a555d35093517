"""A tuned run and its base: how `worldloom tune` starts a run from another, and how one is loaded.

A tuned run's ``config.yaml`` is its base run's (same model, same tokenizer) with the tuning
recipe, its own ``train`` section, and ``tune.base`` / ``tune.base_hash``: the base run folder
and the sha256 of the base checkpoint's weights. With ``lora.rank`` >= 1 its checkpoints hold
only what it trained (the adapters, and a head the base lacks): loading it loads the base
(checked against the hash: a base trained further since would silently change the model),
adds the adapters, then the checkpoint. With ``lora.rank=0`` every weight is in the checkpoint
and the base is only its provenance.

A base may itself be a tuned LoRA run (DPO on top of a LoRA SFT): its adapters are merged
into the weights the new run starts from.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

from torch import nn

from ..checkpoint import latest_checkpoint
from ..config import RunConfig, from_dict, to_dict
from ..errors import CheckpointError, ConfigError


def weights_hash(run_dir: Path) -> str:
    """sha256 of the newest checkpoint's model.safetensors of a run."""
    ckpt = latest_checkpoint(Path(run_dir))
    if ckpt is None:
        raise CheckpointError(f"run folder {run_dir} holds no checkpoint yet (train it first)")
    h = hashlib.sha256()
    with open(ckpt / "model.safetensors", "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def base_dir(cfg: RunConfig, run_dir: Path | None = None) -> Path:
    """The base run folder of a tuned run: where it was, or (moved together) beside the tuned run."""
    where = Path(cfg.tune.base)
    if where.is_dir() or run_dir is None:
        return where
    beside = Path(run_dir).parent / where.name
    return beside if beside.is_dir() else where


def base_state(cfg: RunConfig, run_dir: Path | None = None) -> dict:
    """The weights a tuned run starts from: its base run's, adapters merged, hash checked."""
    from ..adapters.lora import merged_state
    from ..run import load_run

    where = base_dir(cfg, run_dir)
    if not where.is_dir():
        raise CheckpointError(f"base run {cfg.tune.base} of this tuned run is not found; put it back (or beside the tuned run)")
    if cfg.tune.base_hash and weights_hash(where) != cfg.tune.base_hash:
        raise CheckpointError(f"base run {where} has changed since this run was tuned from it (its weights' sha256 differs); "
                              "restore that checkpoint or tune again")
    return merged_state(load_run(where).model)


def prepare_tuned(model: nn.Module, cfg: RunConfig, run_dir: Path | None = None) -> None:
    """Load the base's weights into a freshly built model and, with lora.rank >= 1, add the adapters.
    Parameters the base lacks (a reward model's value head) stay trainable."""
    from ..adapters.lora import apply_lora

    state = base_state(cfg, run_dir)
    missing, unexpected = model.load_state_dict(state, strict=False)
    missing = [k for k in missing if not (k == "head.weight" and cfg.model.tie_weights)]
    if unexpected or any(not k.startswith("value.") for k in missing):
        raise CheckpointError(f"base run {cfg.tune.base} does not fit this run's model "
                              f"({'unexpected ' + unexpected[0] if unexpected else 'missing ' + missing[0]})")
    if cfg.lora.rank:
        lc = cfg.lora
        apply_lora(model, lc.rank, lc.alpha, lc.dropout, lc.targets)
        for name, p in model.named_parameters():
            if name in missing:
                p.requires_grad_(True)


def tuned_config(base: Path, recipe: str, overrides: list[str], train_defaults: dict) -> RunConfig:
    """The config of a new tuned run: the base's model and tokenizer, the recipe, ``train_defaults``
    under the user's overrides, and where it came from."""
    from ..config import apply_overrides
    from ..run import read_run_config

    base = Path(base)
    bcfg = read_run_config(base)
    if bcfg.quant.bits:
        from ..quant import refuse_quantised

        refuse_quantised(bcfg, base, f"be tuned ({recipe})")
    from ..recipes import get_recipe

    if get_recipe(bcfg.recipe).world:
        raise ConfigError(f"{base} is a {bcfg.recipe} (world) run; `worldloom tune {recipe}` tunes text runs (world runs: `worldloom tune ppo`)")
    data = to_dict(bcfg)
    data.update(recipe=recipe, name=recipe, train=dict(train_defaults), lora={}, dpo={}, orpo={})
    data["tune"] = {k: v for k, v in data["tune"].items() if k in ("prompt_format", "stop")}  # a chat template carries over
    data["model"]["value_head"] = False
    data["data"] = {"path": ""}
    apply_overrides(data, overrides)
    blocked = [o for o in overrides if o.split("=", 1)[0].split(".")[0] in ("model", "tokenizer")]
    if blocked:
        raise ConfigError(f"{blocked[0].split('=')[0]} cannot change when tuning: the model and tokenizer are the base run's")
    data["tune"].update(base=str(base.resolve()), base_hash=weights_hash(base))
    return from_dict(RunConfig, data)
