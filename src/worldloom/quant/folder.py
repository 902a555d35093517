"""Quantised run folders: `worldloom quantize RUN --bits 8|1.58`, and how one loads.

A quantised run is a normal run folder: ``config.yaml`` is its base run's with ``quant.bits``
(8 or 1.58) and ``tune.base`` / ``tune.base_hash`` (the run it came from, as provenance), the
tokenizer copied, and a checkpoint whose ``model.safetensors`` holds each backbone linear as
``<name>.weight_q`` int8 + ``<name>.weight_scale`` (8 bits) or ``<name>.weight_packed`` uint8, four
2-bit weights a byte, + ``<name>.weight_scale`` (1.58 bits); every other weight as the base had it.
Its ``state.json`` says ``"packed": bits``; such a checkpoint has no optimizer state and is never
trained further (``refuse_packed``).

- ``--bits 8``: weight-only int8 of the base's weights; no training; the folder is written at once
  (built under a temporary name, renamed into place).
- ``--bits 1.58``: recipe ``ternary`` (worldloom.recipes.ternary): the base's model with BitLinear
  layers, fine-tuned on the base's own training text by the one training loop (quantisation-aware,
  straight-through); its checkpoints hold the latent full-precision weights while it trains (so
  `worldloom train --resume` continues a killed QAT), and when training ends ``pack_run`` replaces
  the last one with the packed ternary weights.
"""

from __future__ import annotations

import shutil
from pathlib import Path

from ..checkpoint import latest_checkpoint, read_state, save_checkpoint
from ..config import RunConfig, apply_overrides, from_dict, save_yaml, to_dict
from ..errors import CheckpointError, ConfigError
from ..io import atomic_folder, check_new_folder
from .layers import BitLinear, quantiser, shell, swap_linears, to_bitlinear

INT8, TERNARY = 8.0, 1.58
SUFFIX = {INT8: "int8", TERNARY: "ternary"}


def parse_bits(text: str) -> float:
    """--bits: 8 or 1.58 (one line otherwise)."""
    try:
        bits = float(text)
    except ValueError:
        bits = None
    if bits not in SUFFIX:
        raise ConfigError(f"--bits must be 8 (weight-only int8, no training) or 1.58 (ternary, BitNet b1.58 "
                          f"quantisation-aware fine-tuning), got {text!r}")
    return bits


def refuse_quantised(cfg: RunConfig, run_dir: Path, doing: str) -> None:
    """ConfigError when a quantised run would be trained (tuned, quantised again) in full precision."""
    if cfg.quant.bits:
        base = f" ({cfg.tune.base})" if cfg.tune.base else ""
        raise ConfigError(f"{run_dir} is a quantised run (quant.bits={cfg.quant.bits:g}); it cannot {doing}: "
                          f"its weights are not full precision. Use its base run{base} and quantise the result again")


def refuse_packed(cfg: RunConfig, run_dir: Path, state: dict) -> None:
    """`train --resume` of a run whose checkpoint holds packed quantised weights: refused."""
    if state.get("packed"):
        refuse_quantised(cfg, run_dir, "train further")


def quant_config(base: Path, bits: float, overrides: list[str]) -> RunConfig:
    """The config of the quantised run of ``base``: the base's, with quant.bits, provenance, and
    name / out_dir (and, for 1.58 bits, train.*) from the overrides."""
    from ..run import read_run_config
    from ..tune.base import weights_hash

    base = Path(base)
    bcfg = read_run_config(base)
    refuse_quantised(bcfg, base, "be quantised again")
    from ..recipes import get_recipe

    if get_recipe(bcfg.recipe).world:
        raise ConfigError(f"{base} is a {bcfg.recipe} (world) run; `worldloom quantize` takes text runs (world runs are not supported yet)")
    if bits == TERNARY and bcfg.recipe != "text":
        raise ConfigError(f"{base} is a {bcfg.recipe} run; ternary QAT fine-tunes on the base's own text file, which "
                          "only a text run has (quantise this one with --bits 8)")
    allowed = ("name", "out_dir", "quant.kernel") + (("train",) if bits == TERNARY else ())
    bad = [o for o in overrides if o.split("=", 1)[0] not in allowed and o.split("=", 1)[0].split(".")[0] not in allowed]
    if bad:
        raise ConfigError(f"{bad[0].split('=')[0]} cannot be set by `quantize --bits {bits:g}` "
                          f"(it takes {', '.join(k + ('.*' if k == 'train' else '=') for k in allowed)})")
    data = to_dict(bcfg)
    data.update(name=f"{base.name}-{SUFFIX[bits]}", out_dir=str(base.parent), lora={}, quant={"bits": bits, "kernel": "exact"})
    if bits == TERNARY:
        data["recipe"] = "ternary"
    apply_overrides(data, overrides)
    data["tune"].update(base=str(base.resolve()), base_hash=weights_hash(base))
    return from_dict(RunConfig, data)


def quantize(base: Path, bits: float, overrides: list[str], progress: bool = True, log=print) -> Path:
    """`worldloom quantize RUN --bits B`: the new quantised run folder."""
    cfg = quant_config(base, bits, overrides)
    if bits == TERNARY and latest_checkpoint(cfg.run_dir) is not None:
        raise ConfigError(f"{cfg.run_dir} already holds a run; continue a stopped QAT with `worldloom train --resume "
                          f"{cfg.run_dir}`, or choose another name=")
    check_new_folder(cfg.run_dir)  # before any work: an existing folder is refused at once
    if bits == INT8:
        return write_int8(cfg, Path(base), log)
    from ..recipes import get_recipe

    get_recipe(cfg.recipe).run(cfg, progress=progress, log=log)
    return cfg.run_dir


def write_int8(cfg: RunConfig, base: Path, log=print) -> Path:
    """The weight-only int8 run of ``base``, written as one folder."""
    from ..model import LWM
    from ..run import TOKENIZER_DIR
    from ..tune.base import prepare_tuned

    model = LWM(cfg.model)
    prepare_tuned(model, cfg)  # the base's weights (a LoRA base merged), hash checked
    names = swap_linears(model, quantiser(INT8))
    step = read_state(latest_checkpoint(base))["step"]
    with atomic_folder(cfg.run_dir) as tmp:
        save_yaml(to_dict(cfg), tmp / "config.yaml")
        shutil.copytree(base / TOKENIZER_DIR, tmp / TOKENIZER_DIR)
        save_checkpoint(tmp, model, None, {"step": step, "elapsed": 0.0, "packed": INT8, "quantised_from": str(base.resolve())})
    log(f"wrote {cfg.run_dir}: {len(names)} backbone linear layers as int8 with per-channel scales")
    return cfg.run_dir


def pack_run(run_dir: Path, log=print) -> Path:
    """Replace a finished ternary QAT run's last checkpoint (latent weights) by its packed ternary weights."""
    from ..run import load_run

    run = load_run(run_dir)
    if run.state.get("packed"):
        return run.checkpoint
    names = swap_linears(run.model, quantiser(TERNARY))
    keep = ("step", "elapsed", "precision", "val_loss")
    ckpt = save_checkpoint(run_dir, run.model, None, {**{k: run.state[k] for k in keep if k in run.state}, "packed": TERNARY})
    log(f"packed {len(names)} backbone linear layers as ternary weights (2 bits each + one scale per layer) in {ckpt}")
    return ckpt


def prepare_loaded(model, cfg: RunConfig, state: dict) -> None:
    """Before a quantised run's checkpoint is loaded: the layers it fits (load_run calls this)."""
    packed = state.get("packed")
    if packed:
        if packed != cfg.quant.bits:
            raise CheckpointError(f"checkpoint holds {packed}-bit weights but the config says quant.bits={cfg.quant.bits:g}")
        swap_linears(model, shell(cfg.quant.bits, cfg.quant.kernel))
    elif cfg.quant.bits == TERNARY:  # a QAT run still training: latent full-precision weights
        swap_linears(model, to_bitlinear)
    else:
        raise CheckpointError(f"quantised run (quant.bits={cfg.quant.bits:g}) whose checkpoint holds no quantised weights")


def start_qat(model, cfg: RunConfig) -> None:
    """A ternary QAT run's model before its first step: the base's weights, every backbone linear a BitLinear."""
    from ..tune.base import prepare_tuned

    prepare_tuned(model, cfg)
    swap_linears(model, to_bitlinear)
    assert any(isinstance(m, BitLinear) for m in model.modules()), "no linear layer to quantise"
