"""Environment adapters, one per environment family, and ``make_adapter(env_id)``.

See ``base.py`` for the protocol; ``minigrid.py`` for MiniGrid / BabyAI; ``pixels.py`` for the pixel
families (``rgb:``MiniGrid views, Crafter, Atari). Another family is
one more module with an ``EnvAdapter`` subclass, listed in ``ADAPTERS``.
"""

from __future__ import annotations

import difflib

from ...errors import EnvError
from .base import EnvAdapter, QuietReset
from .minigrid import MiniGridAdapter
from .pixels import AtariAdapter, CrafterAdapter, MiniGridRGBAdapter

__all__ = ["ADAPTERS", "AtariAdapter", "CrafterAdapter", "EnvAdapter", "MiniGridAdapter", "MiniGridRGBAdapter",
           "QuietReset", "make_adapter"]

ADAPTERS: tuple[type[EnvAdapter], ...] = (MiniGridAdapter, MiniGridRGBAdapter, CrafterAdapter, AtariAdapter)


def _installed_ids(cls: type[EnvAdapter]) -> list[str]:
    try:
        return cls.known_ids()
    except EnvError:  # the family's package is not installed: nothing to suggest from it
        return []


def make_adapter(env_id: str) -> EnvAdapter:
    """The adapter for a registered environment id; EnvError (with a suggestion) otherwise."""
    env_id = str(env_id)
    for cls in ADAPTERS:
        if cls.handles(env_id):
            known = cls.known_ids()
            if env_id in known:
                return cls(env_id)
            break
    known = [k for cls in ADAPTERS for k in _installed_ids(cls)]
    close = difflib.get_close_matches(env_id, known, n=1, cutoff=0.6)
    if close:
        raise EnvError(f"unknown environment {env_id!r}; did you mean {close[0]!r}?")
    families = ", ".join(f"{p}*" for cls in ADAPTERS for p in cls.prefixes)
    raise EnvError(f"unknown environment {env_id!r}; supported: registered {families} ids, e.g. 'BabyAI-GoToLocal-v0'")
