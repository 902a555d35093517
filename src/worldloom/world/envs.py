"""Environment adapters: everything worldloom needs to know about one environment family.

An adapter turns a gymnasium environment into the fields of the episode schema
(``worldloom.world.episodes``) without the schema knowing the family:

- ``obs_fields``: name -> (shape, dtype) of every stored observation field, e.g. MiniGrid's
  ``{"image": ((7, 7, 3), uint8), "direction": ((), uint8)}``; a pixel environment (Crafter,
  Atari) would declare ``{"pixels": ((64, 64, 3), uint8)}``;
- ``n_actions`` / ``action_names``: the discrete action set;
- ``make(render_mode=None)``: a fresh ``gymnasium.Env``;
- ``observe(obs)``: the stored fields picked out of a raw gymnasium observation;
- ``mission(obs)``: the mission text ("" for environments without one);
- ``max_steps(env)``: the environment's own step limit (valid after ``reset``).

``make_adapter(env_id)`` picks the adapter class whose ``handles(env_id)`` is true. Today that
is ``MiniGridAdapter`` for every registered ``MiniGrid-*`` and ``BabyAI-*`` id; another family
is added as another ``EnvAdapter`` subclass listed in ``ADAPTERS``.
"""

from __future__ import annotations

import contextlib
import difflib
import os
from typing import Any, ClassVar

import gymnasium as gym
import numpy as np

from ..errors import EnvError

ObsFields = dict[str, tuple[tuple[int, ...], np.dtype]]


class EnvAdapter:
    """Base class of the adapters; subclasses set the class attributes and implement the methods."""

    kind: ClassVar[str] = ""  # recorded in meta.json, e.g. "minigrid"
    prefixes: ClassVar[tuple[str, ...]] = ()  # gymnasium id prefixes this adapter handles

    def __init__(self, env_id: str):
        self.env_id = env_id
        self.obs_fields: ObsFields = {}
        self.n_actions: int = 0
        self.action_names: tuple[str, ...] = ()

    @classmethod
    def handles(cls, env_id: str) -> bool:
        return env_id.startswith(cls.prefixes)

    @classmethod
    def known_ids(cls) -> list[str]:
        """Registered gymnasium ids of this family (after importing the family's package)."""
        cls._import_family()
        return sorted(k for k in gym.envs.registry if cls.handles(k))

    @classmethod
    def _import_family(cls) -> None:
        """Import the package that registers this family's ids (EnvError if it is missing)."""

    def make(self, render_mode: str | None = None) -> gym.Env:
        raise NotImplementedError

    def observe(self, obs: Any) -> dict[str, np.ndarray]:
        raise NotImplementedError

    def mission(self, obs: Any) -> str:
        return ""

    def max_steps(self, env: gym.Env) -> int:
        raise NotImplementedError

    def novel_objects(self, episodes: list) -> list[np.ndarray | None]:
        """For each Episode, (T,) counts of the objects that o_{t+1} shows at places no earlier
        observation of the episode showed (None where this environment cannot tell).

        A next observation that reveals such an object cannot be predicted exactly from the
        history by any model: the evaluation reports exact-frame accuracy with and without them.
        """
        return [None for _ in episodes]

    def describe(self) -> dict:
        """The adapter as JSON-able metadata (for meta.json)."""
        return {
            "env_id": self.env_id,
            "adapter": self.kind,
            "obs_fields": {k: {"shape": list(s), "dtype": np.dtype(d).name} for k, (s, d) in self.obs_fields.items()},
            "n_actions": self.n_actions,
            "action_names": list(self.action_names),
        }

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.env_id!r})"


class QuietReset(gym.Wrapper):
    """Discards what the environment prints to stdout during ``reset``.

    BabyAI levels generate their layout by rejection sampling and print a line such as
    "Sampling rejected: unreachable object at (3, 4)" for every rejected layout.
    """

    def reset(self, **kwargs):
        with open(os.devnull, "w") as sink, contextlib.redirect_stdout(sink):
            return self.env.reset(**kwargs)


class MiniGridAdapter(EnvAdapter):
    """MiniGrid and BabyAI: a 7x7x3 egocentric symbolic view, a direction, a mission, 7 actions."""

    kind = "minigrid"
    prefixes = ("MiniGrid-", "BabyAI-")

    def __init__(self, env_id: str):
        super().__init__(env_id)
        self._import_family()
        from minigrid.core.actions import Actions

        self.obs_fields = {"image": ((7, 7, 3), np.dtype(np.uint8)), "direction": ((), np.dtype(np.uint8))}
        self.action_names = tuple(a.name for a in Actions)
        self.n_actions = len(self.action_names)

    @classmethod
    def _import_family(cls) -> None:
        try:
            import minigrid  # noqa: F401  (registers the MiniGrid-* and BabyAI-* ids)
        except ImportError:
            raise EnvError("environment package 'minigrid' is not installed; run `pip install minigrid`") from None

    def make(self, render_mode: str | None = None) -> gym.Env:
        return QuietReset(gym.make(self.env_id, render_mode=render_mode))

    def observe(self, obs: dict) -> dict[str, np.ndarray]:
        return {
            "image": np.asarray(obs["image"], dtype=np.uint8),
            "direction": np.asarray(obs["direction"], dtype=np.uint8),
        }

    def mission(self, obs: dict) -> str:
        return str(obs.get("mission", ""))

    def max_steps(self, env: gym.Env) -> int:
        return int(env.unwrapped.max_steps)

    def novel_objects(self, episodes: list) -> list[np.ndarray | None]:
        """Replays each episode from its seed and actions and maps every visible view cell to its
        place in the grid (minigrid's ``relative_coords``); an object is any cell that is neither
        empty nor wall. An episode whose replay does not reproduce its stored observations gets None."""
        env = self.make()
        out = []
        try:
            for ep in episodes:
                out.append(self._novel(env, ep))
        finally:
            env.close()
        return out

    @staticmethod
    def _novel(env: gym.Env, ep) -> np.ndarray | None:
        from minigrid.core.constants import OBJECT_TO_IDX

        plain = (OBJECT_TO_IDX["unseen"], OBJECT_TO_IDX["empty"], OBJECT_TO_IDX["wall"])
        obs, _ = env.reset(seed=int(ep.seed))
        u = env.unwrapped
        W, H = u.grid.width, u.grid.height

        def visible(img) -> dict:
            vis = {}
            x0, y0, x1, y1 = u.get_view_exts()  # the square of grid cells the view can cover
            for x, y in ((x, y) for x in range(max(x0, 0), min(x1, W)) for y in range(max(y0, 0), min(y1, H))):
                rc = u.relative_coords(x, y)
                if rc is not None and img[rc[0], rc[1], 0] != plain[0]:
                    vis[(x, y)] = int(img[rc[0], rc[1], 0])
            return vis

        if not np.array_equal(obs["image"], ep.obs["image"][0]):
            return None
        seen = set(visible(obs["image"]))
        counts = np.zeros(ep.length, np.int64)
        for t, a in enumerate(ep.action):
            obs, *_ = env.step(int(a))
            if not np.array_equal(obs["image"], ep.obs["image"][t + 1]):
                return None
            vis = visible(obs["image"])
            counts[t] = sum(1 for k, v in vis.items() if k not in seen and v not in plain)
            seen.update(vis)
        return counts


ADAPTERS: tuple[type[EnvAdapter], ...] = (MiniGridAdapter,)


def make_adapter(env_id: str) -> EnvAdapter:
    """The adapter for a registered environment id; EnvError (with a suggestion) otherwise."""
    env_id = str(env_id)
    for cls in ADAPTERS:
        if cls.handles(env_id):
            known = cls.known_ids()
            if env_id in known:
                return cls(env_id)
            break
    known = [k for cls in ADAPTERS for k in cls.known_ids()]
    close = difflib.get_close_matches(env_id, known, n=1, cutoff=0.6)
    if close:
        raise EnvError(f"unknown environment {env_id!r}; did you mean {close[0]!r}?")
    families = ", ".join(f"{p}*" for cls in ADAPTERS for p in cls.prefixes)
    raise EnvError(f"unknown environment {env_id!r}; supported: registered {families} ids, e.g. 'BabyAI-GoToLocal-v0'")
