"""The vision prefix (issue 16, requirement 5; LLaVA-style): the view seen as pixels, encoded by a small
CNN, projected by an MLP into the backbone's embedding space, and read by the talk model as K
continuous vectors where a token view has its 50 ids (``talk.view=prefix``, docs/talk.md).

    view (V, V, 3) cells -> rendered RGB (V*tile, V*tile, 3), MiniGrid's renderer as the rgb: envs draw it
      -> ViewEncoder: a tile x tile patch stem (one vector per cell), two residual 3x3 conv blocks,
         pooled to grid x grid, a learned position per vector           -> (N, K = grid*grid, channels)
      -> Projector: Linear, GELU, Linear                                -> (N, K, d_model)

Training goes in two stages, as LLaVA's does: for ``prefix.stage1_steps`` optimizer steps only the
encoder and projector learn (``StageFreeze``: every other parameter's gradient is dropped as soon as it
is accumulated, so AdamW skips it, weight decay included, and its weights stay exactly as they were);
then everything learns. The backbone starts from ``prefix.base`` (a talk run with token views) when
one is given: its stream layout and model config are the run's, its weights loaded before the prefix
is attached.
"""

from __future__ import annotations

from dataclasses import fields
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ..errors import ConfigError, WorldloomError


class _Block(nn.Module):
    """x + conv(gelu(conv(gelu(norm(x))))): a residual 3x3 block that mixes neighbouring cells."""

    def __init__(self, channels: int):
        super().__init__()
        self.norm = nn.GroupNorm(1, channels)
        self.conv1 = nn.Conv2d(channels, channels, 3, padding=1)
        self.conv2 = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.conv2(F.gelu(self.conv1(F.gelu(self.norm(x)))))


class ViewEncoder(nn.Module):
    """RGB views (N, V*tile, V*tile, 3) uint8 -> (N, grid*grid, channels), the vectors row by row."""

    def __init__(self, view: int, tile: int, channels: int, grid: int):
        super().__init__()
        self.view, self.tile, self.grid = view, tile, grid
        self.stem = nn.Conv2d(3, channels, tile, stride=tile)  # one patch per view cell
        self.blocks = nn.Sequential(_Block(channels), _Block(channels))
        self.pos = nn.Parameter(torch.randn(grid * grid, channels) * 0.02)
        self.norm = nn.LayerNorm(channels)

    @property
    def side(self) -> int:
        return self.view * self.tile

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        if images.ndim != 4 or tuple(images.shape[1:]) != (self.side, self.side, 3):
            raise ValueError(f"the vision prefix reads {self.side}x{self.side}x3 views ({self.view} cells of {self.tile} px); "
                             f"got images of shape {tuple(images.shape)}")
        x = images.permute(0, 3, 1, 2).float() / 127.5 - 1.0  # (N, 3, H, W) in [-1, 1]
        x = self.blocks(self.stem(x))  # (N, C, V, V)
        if self.grid != self.view:
            x = F.adaptive_avg_pool2d(x, self.grid)  # (N, C, grid, grid)
        x = x.flatten(2).transpose(1, 2)  # (N, grid*grid, C)
        return self.norm(x + self.pos)


class VisionPrefix(nn.Module):
    """Encoder then projector: RGB views (N, H, W, 3) -> (N, K, d_model), the model's ``vision_prefix``."""

    def __init__(self, view: int, pc, d_model: int):
        super().__init__()
        self.encoder = ViewEncoder(view, pc.tile, pc.channels, pc.grid)
        self.projector = nn.Sequential(nn.Linear(pc.channels, pc.hidden), nn.GELU(), nn.Linear(pc.hidden, d_model))

    @property
    def vectors(self) -> int:
        return self.encoder.grid ** 2

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.projector(self.encoder(images))


def check_prefix(pc, view: int) -> None:
    """One line for a prefix that does not fit the run's view."""
    if pc.grid > view:
        raise ConfigError(f"prefix.grid={pc.grid} asks for more vectors per side than the view has cells ({view}); "
                          f"give prefix.grid <= {view}")


def attach_prefix(model: nn.Module, cfg, view: int) -> VisionPrefix:
    """A fresh ``VisionPrefix`` as ``model.vision_prefix`` (before its weights are loaded or it is trained)."""
    check_prefix(cfg.prefix, view)
    model.vision_prefix = VisionPrefix(view, cfg.prefix, cfg.model.d_model)
    return model.vision_prefix


class ViewRenderer:
    """Symbolic views (N, V, V, 3) -> RGB (N, V*tile, V*tile, 3) uint8, drawn by the environment adapter's
    renderer (MiniGrid's, as the ``rgb:`` envs draw the agent's view)."""

    def __init__(self, env_id: str, tile: int):
        from ..world.envs import make_adapter

        self.adapter, self.tile = make_adapter(env_id), tile

    def __call__(self, images) -> np.ndarray:
        images = np.asarray(images, np.uint8)
        if not len(images):
            return np.zeros((0, images.shape[1] * self.tile, images.shape[2] * self.tile, 3), np.uint8)
        return np.stack([np.asarray(self.adapter.render({"image": im}, self.tile), np.uint8) for im in images])


class StageFreeze:
    """Stage 1 of LLaVA's recipe on a model with a vision prefix: while ``frozen``, every parameter outside
    ``model.vision_prefix`` has its gradient dropped once accumulated (so the optimizer skips it)."""

    def __init__(self, model: nn.Module):
        own = {id(p) for p in model.vision_prefix.parameters()}
        self.frozen = False
        self.handles = [p.register_post_accumulate_grad_hook(self._drop) for p in model.parameters() if id(p) not in own]

    def _drop(self, p: torch.Tensor) -> None:
        if self.frozen:
            p.grad = None


def load_base(model: nn.Module, base: str) -> None:
    """The base talk run's weights into ``model`` (an LWM without its prefix yet); one line if they do not fit."""
    from ..checkpoint import latest_checkpoint, load_model_weights

    ckpt = latest_checkpoint(Path(base))
    if ckpt is None:
        raise ConfigError(f"prefix.base={base} holds no checkpoint (train it first: worldloom train babyai-talk)")
    load_model_weights(model, ckpt)


def base_config(cfg):
    """The resolved config of ``prefix.base`` (a talk run with token views, the same stream settings), or None."""
    if not cfg.prefix.base:
        return None
    from ..run import read_run_config

    try:
        base = read_run_config(Path(cfg.prefix.base))
    except WorldloomError as e:
        raise ConfigError(f"prefix.base: {e}") from None
    if base.recipe != "talk" or base.talk.view != "tokens":
        raise ConfigError(f"prefix.base={cfg.prefix.base} is a {base.recipe} run (talk.view={base.talk.view}); "
                          "the backbone starts from a talk run with token views (worldloom train babyai-talk)")
    if base.stream != cfg.stream:
        key = next(f.name for f in fields(cfg.stream) if getattr(cfg.stream, f.name) != getattr(base.stream, f.name))
        raise ConfigError(f"prefix.base={cfg.prefix.base} has stream.{key}={getattr(base.stream, key)}, this run "
                          f"{getattr(cfg.stream, key)}; give the base's stream settings")
    return base


def prepare_prefix_model(model: nn.Module, cfg, view: int, resuming: bool) -> StageFreeze:
    """The base run's weights (a new run with ``prefix.base``), then a fresh vision prefix and the stage-1 freeze."""
    if cfg.prefix.base and not resuming:
        load_base(model, cfg.prefix.base)
    attach_prefix(model, cfg, view)
    return StageFreeze(model)


def view_renderer(run) -> ViewRenderer | None:
    """A loaded talk run's renderer of views for its vision prefix; None for a run with token views."""
    return ViewRenderer(run.cfg.env.id, run.cfg.prefix.tile) if run.model.vision_prefix is not None else None
