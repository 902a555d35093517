"""Sequence backbones behind one protocol, resolved by name.

A backbone maps embeddings to hidden states: ``forward(x, cache=None, causal=True) -> (h, cache)``
with ``x`` of shape (B, T, C) (``causal=False``: a bidirectional pass, see stack.py). ``new_cache(batch, max_len, pad=None)`` returns the state it
needs for incremental decoding (an object with ``length``, ``max_len`` and ``pad``: keys and
values for attention, recurrent states for the others). A backbone may offer
``decode_step(x, cache, slot)`` for compiled decoding and says so with
``supports_decode_step``. A new backbone is one module plus one ``@register("name")`` line;
configs name it with ``model.backbone=<name>``. The built-in ones (``transformer``,
``mamba``, ``mamba2``, ``retnet``, ``linear``, ``hybrid``) are all the layer stack of ``stack.py``.

The layers of that stack are mixers registered by name (``mixer.py``): a new mixer is one
module with one ``@register_mixer("name")`` line, imported below.
"""

from __future__ import annotations

import difflib
from typing import Callable

from torch import nn

from ..errors import ConfigError

BACKBONES: dict[str, Callable[..., nn.Module]] = {}


def register(name: str):
    def deco(builder):
        BACKBONES[name] = builder
        return builder

    return deco


def build_backbone(cfg) -> nn.Module:
    if cfg.backbone not in BACKBONES:
        close = difflib.get_close_matches(cfg.backbone, list(BACKBONES), n=1)
        hint = f"; did you mean '{close[0]}'?" if close else ""
        raise ConfigError(f"unknown model.backbone '{cfg.backbone}'{hint} available: {', '.join(sorted(BACKBONES))}")
    return BACKBONES[cfg.backbone](cfg)


from .mixer import MIXERS, register_mixer  # noqa: E402,F401
from . import transformer, mamba, mamba2, retnet, linear_attention  # noqa: E402,F401  (each registers its mixer)
from . import stack  # noqa: E402,F401  (registers "hybrid")
