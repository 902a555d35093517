"""A pixel world run's observation tokenizer: an image-tokenizer run, named or trained first.

A world run over a pixel environment (``rgb:<MiniGrid id>``, ``crafter``, ``ALE/<game>-v5``) streams
every frame as the codes of an image tokenizer (``ImageTokenizer``), laid out like grid cells:

    worldloom train babyai-rgb                                   # tokenizer stage, then the world model
    worldloom train babyai-rgb stream.tokenizer=runs/tokenizer-vq   # reuse a trained tokenizer run

``stream.tokenizer=RUN`` names a `worldloom train tokenizer-vq` run. When it is empty, the world
pipeline first trains one into ``<run>/tokenizer`` — the preset ``tokenizer-vq`` with the world
run's ``env.id``, ``vision.*`` and seed, for ``vision.minutes`` (or ``vision.max_steps``) — a run
folder like any other (its frames, reconstructions, ``worldloom eval`` figures). Either way the
tokenizer's weights are then saved with the world run's stream layout (``stream/``), so the world
run stands alone. A tokenizer trained on frames of another size or environment is refused in one line.
"""

from __future__ import annotations

from pathlib import Path

from ..config import RunConfig, from_dict, load_preset, to_dict
from ..errors import ConfigError

TOKENIZER_DIR = "tokenizer"
STAGE_PRESET = "tokenizer-vq"


def has_pixels(env_id: str) -> bool:
    """Whether the environment's observations are frames (an image tokenizer streams them)."""
    from ..world.envs import make_adapter
    from ..world.envs.pixels import PIXELS

    return PIXELS in make_adapter(env_id).obs_fields


def tokenizer_dir(cfg: RunConfig, run_dir: Path) -> Path:
    """The image-tokenizer run a pixel world run streams through: ``stream.tokenizer``, else its own stage."""
    return Path(cfg.stream.tokenizer) if cfg.stream.tokenizer else Path(run_dir) / TOKENIZER_DIR


def stage_config(cfg: RunConfig, run_dir: Path) -> RunConfig:
    """The tokenizer stage's config: preset tokenizer-vq with the world run's env, vision settings, seed,
    threads and device, its budget from vision.minutes / vision.max_steps, in ``<run>/tokenizer``."""
    data = load_preset(STAGE_PRESET)
    data.update(name=TOKENIZER_DIR, out_dir=str(run_dir), env=to_dict(cfg.env), vision=to_dict(cfg.vision))
    data["data"] = {**data.get("data", {}), "seed": cfg.data.seed}
    vc, tc = cfg.vision, cfg.train
    data["train"] = {**data["train"], "max_minutes": vc.minutes, "max_steps": vc.max_steps or 10**9, "seed": tc.seed,
                     "threads": tc.threads, "device": tc.device}
    return from_dict(RunConfig, data)


def ensure_tokenizer(cfg: RunConfig, run_dir: Path, progress: bool = True, log=print) -> Path:
    """The tokenizer run of a pixel world run, trained first (or finished, if a kill interrupted it) when the
    world run trains its own; checked against the environment's frames either way."""
    from ..recipes import image_tokenizer, tokenizer_stage

    where = tokenizer_dir(cfg, run_dir)
    budget = f"{cfg.vision.minutes:g} min{f' or {cfg.vision.max_steps} steps' if cfg.vision.max_steps else ''}"
    tokenizer_stage(where, cfg.stream.tokenizer, "stream.tokenizer", "worldloom train tokenizer-vq", image_tokenizer,
                    lambda: stage_config(cfg, run_dir), f"an image tokenizer for {cfg.env.id} ({budget})", progress, log)
    image_tokenizer_for(cfg, run_dir)  # refuse a tokenizer of other frames now, not after the world model trained
    return where


def image_tokenizer_for(cfg: RunConfig, run_dir: Path):
    """The ImageTokenizer of a pixel world run's tokenizer run, checked against the environment's frames."""
    from ..world.envs import make_adapter
    from ..world.envs.pixels import PIXELS
    from .tokenizer import ImageTokenizer

    where = tokenizer_dir(cfg, run_dir)
    tok = ImageTokenizer.from_run(where)
    shape = tuple(make_adapter(cfg.env.id).obs_fields[PIXELS][0])
    if tok.frame_shape != shape:
        raise ConfigError(f"the image tokenizer in {where} reads {'x'.join(map(str, tok.frame_shape))} frames "
                          f"(trained on {tok.env_id}), but {cfg.env.id} gives {'x'.join(map(str, shape))}; "
                          f"train one on {cfg.env.id} (`worldloom train tokenizer-vq env.id={cfg.env.id}`)")
    return tok
