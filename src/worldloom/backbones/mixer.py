"""The mixer seam: what a sequence mixer is, how the layer stack calls it, and the registry of them.

A mixer is the token-mixing half of a layer (attention, Mamba, Mamba-2, retention, linear
attention ...). A new one is one module plus one registration next to its class:

    @register_mixer("mamba", backbone="mamba")
    def build(cfg: ModelConfig) -> nn.Module: ...

``model.layers`` may then name it, and ``backbone`` (optional) adds a single-kind backbone of
that name (``model.backbone=mamba``: every layer a mamba layer). ``check(cfg)`` (optional)
rejects a model config the mixer cannot be built from, with a one-line ConfigError.

Every mixer is called the same way by the stack, ``mixer.mix(x, ctx, layer) -> y``, with a
``MixerContext`` that holds what any mixer may need for this call (the cache, rotary tables
and attention mask, the left-padding ``valid`` mask); each reads what it uses. Mixers with a
recurrent state inherit ``mix`` from ``RecurrentMixer``: they provide
``forward(x, state, return_state, valid) -> (y, state)`` and ``step(x, state)``. The others
(attention) set ``recurrent = False`` and write their own ``mix``; the stack prepares rotary
tables and the mask only if some layer is such a mixer, ``valid`` only if some layer is recurrent.
"""

from __future__ import annotations

import difflib
from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn

from . import register


@dataclass
class MixerContext:
    """What the stack prepares once per call for all its layers. Absent parts are None.

    cache   the KVCache (keys/values of attention layers, ``states[i]`` of recurrent ones), or None
    cos, sin  rotary tables of the new positions, for attention: (T, D), or (B, 1, T, D) under left padding
    mask    attention mask (bool, broadcastable to (B, H, T, S)); ``causal``: plain causal attention instead.
            A bidirectional pass (``LWM.forward(causal=False)`` or a per-row (B,) flag) comes as a mask that
            opens later positions too (only left padding stays masked); only bidirectional mixers get one
    valid   (B, T) bool: the real tokens while some rows may still be in their left padding (recurrent mixers)
    slot    0-d long tensor: the fixed-shape one-token decoding step at this cache slot (Stack.decode_step)
    ring    the process group over which each sequence is split (model.attention=ring, training): attention
            layers attend with ring attention, and cos/sin are at the tokens' global positions
    """

    cache: object = None
    cos: torch.Tensor | None = None
    sin: torch.Tensor | None = None
    mask: torch.Tensor | None = None
    causal: bool = False
    valid: torch.Tensor | None = None
    slot: torch.Tensor | None = None
    ring: object = None


class RecurrentMixer(nn.Module):
    """Base of the mixers that carry a constant-size state: its ``mix`` keeps the state in
    ``cache.states[layer]``, taking the O(1) ``step`` for a lone decoded token."""

    recurrent = True  # the stack gives these a ``valid`` mask under left padding, no rotary tables

    def mix(self, x: torch.Tensor, ctx: MixerContext, layer: int) -> torch.Tensor:
        cache = ctx.cache
        state = cache.states[layer] if cache is not None else None
        if state is not None and ctx.valid is None and x.shape[1] == 1:
            y, state = self.step(x, state)
        else:
            y, state = self(x, state, return_state=cache is not None, valid=ctx.valid)
        if cache is not None:
            cache.states[layer] = state
        return y


def _no_check(cfg) -> None:
    return None


@dataclass(frozen=True)
class MixerSpec:
    name: str
    build: Callable[..., nn.Module]  # ModelConfig -> the mixer module
    backbone: str | None  # the single-kind backbone made of this mixer only
    check: Callable[..., None]  # ModelConfig -> None, or a one-line ConfigError
    bidirectional: bool = False  # can attend to later positions too (``LWM.forward(causal=False)``: masked objectives)


MIXERS: dict[str, MixerSpec] = {}


def register_mixer(name: str, backbone: str | None = None, check: Callable[..., None] | None = None,
                   bidirectional: bool = False):
    """Decorator on a builder ``cfg -> nn.Module``: ``model.layers`` may name ``name``. ``bidirectional``:
    the mixer obeys a mask that opens later positions (attention does; a recurrent state cannot)."""

    def deco(build):
        MIXERS[name] = MixerSpec(name, build, backbone, check or _no_check, bidirectional)
        if backbone is not None:
            register(backbone)(_single_kind(name))
        return build

    return deco


def _single_kind(kind: str):
    def build(cfg):
        from .stack import Stack

        return Stack(cfg, [kind] * cfg.n_layer)

    build.__name__ = f"build_{kind}"
    return build


def backbone_kind(backbone: str) -> str | None:
    """The mixer of a single-kind backbone (``transformer`` -> ``attn``), None for the others."""
    return next((m.name for m in MIXERS.values() if m.backbone == backbone), None)


def build_mixer(kind: str, cfg) -> nn.Module:
    if kind not in MIXERS:  # the config has validated the names; this is for direct callers
        close = difflib.get_close_matches(kind, list(MIXERS), n=1)
        raise ValueError(f"unknown mixer {kind!r}{f' (did you mean {close[0]!r}?)' if close else ''}")
    return MIXERS[kind].build(cfg)
