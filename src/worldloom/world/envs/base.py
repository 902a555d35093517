"""Environment adapters: everything worldloom needs to know about one environment family.

An adapter turns a gymnasium environment into the fields of the episode schema
(``worldloom.world.data.episodes``) without the schema knowing the family:

- ``obs_fields``: name -> (shape, dtype) of every stored observation field, e.g. MiniGrid's
  ``{"image": ((7, 7, 3), uint8), "direction": ((), uint8)}``; a pixel environment (Crafter,
  Atari) would declare ``{"pixels": ((64, 64, 3), uint8)}``;
- ``n_actions`` / ``action_names``: the discrete action set;
- ``make(render_mode=None)``: a fresh ``gymnasium.Env``;
- ``observe(obs)``: the stored fields picked out of a raw gymnasium observation;
- ``mission(obs)``: the mission text ("" for environments without one);
- ``max_steps(env)``: the environment's own step limit (valid after ``reset``);
- ``obs_tokenizer(meta)``: the observation tokenizer (``worldloom.tokenize.ObsTokenizer``) that
  streams this family's observations, e.g. MiniGrid's ``GridTokenizer`` of its view size;
- ``env_obs(fields, mission)`` / ``observation_space()``: one observation back in the
  environment's own form, and its gymnasium space (what an imagined environment returns);
- ``render(fields, tile_size)``: one observation as an RGB picture (the GIFs, ``render()``);
- ``novel_objects(episodes)`` / ``seen_cells(episodes)``: by replay, what each observation
  reveals for the first time / which of its cells show places seen before (the evaluation).

``make_adapter(env_id)`` picks the adapter class whose ``handles(env_id)`` is true. Today that
is ``MiniGridAdapter`` for every registered ``MiniGrid-*`` and ``BabyAI-*`` id; another family
is added as another ``EnvAdapter`` subclass listed in ``ADAPTERS``.
"""

from __future__ import annotations

import contextlib
import os
from typing import Any, ClassVar

import gymnasium as gym
import numpy as np

from ...errors import EnvError

ObsFields = dict[str, tuple[tuple[int, ...], np.dtype]]


class EnvAdapter:
    """Base class of the adapters; subclasses set the class attributes and implement the methods."""

    kind: ClassVar[str] = ""  # recorded in meta.json, e.g. "minigrid"
    prefixes: ClassVar[tuple[str, ...]] = ()  # gymnasium id prefixes this adapter handles
    place_rule: ClassVar[str] = ""  # the worldloom.world.places rule of its views (stream.places); "" = none

    def __init__(self, env_id: str):
        self.env_id = env_id
        self.obs_fields: ObsFields = {}
        self.n_actions: int = 0
        self.action_names: tuple[str, ...] = ()
        self.achievements: tuple[str, ...] = ()  # what the environment reports as unlocked (Crafter's info["achievements"])

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

    def obs_tokenizer(self, meta: dict | None = None):
        """The observation tokenizer of this family, sized from a dataset's meta.json (its ``obs_fields``)
        when given, else from this adapter's own fields."""
        raise NotImplementedError

    def env_obs(self, fields: dict[str, np.ndarray], mission: str) -> Any:
        """One observation's stored fields (no batch axis) and the mission in the environment's own
        observation form (the inverse of ``observe``): what an imagined environment returns."""
        raise NotImplementedError

    def observation_space(self) -> gym.spaces.Space:
        """The gymnasium space of ``env_obs``'s observations."""
        raise NotImplementedError

    def render(self, fields: dict[str, np.ndarray], tile_size: int = 16) -> np.ndarray:
        """One observation's stored fields (no batch axis) as an RGB picture (H, W, 3) uint8."""
        raise NotImplementedError

    def novel_objects(self, episodes: list) -> list[np.ndarray | None]:
        """For each Episode, (T,) counts of the objects that o_{t+1} shows at places no earlier
        observation of the episode showed (None where this environment cannot tell).

        A next observation that reveals such an object cannot be predicted exactly from the
        history by any model: the evaluation reports exact-frame accuracy with and without them.
        """
        return [None for _ in episodes]

    def seen_cells(self, episodes: list, shown: int | None = None) -> list[np.ndarray | None]:
        """For each Episode, (T+1, *cells) bool: which cells of each observation o_t show a place that
        an earlier real observation o_0..o_{t-1} of the episode showed (None where this environment
        cannot tell). Open-loop imagination is scored on those cells only (the rest were never seen).
        With ``shown=n``, only the first n real observations count as showing places (open-loop
        imagination from o_0 is shown o_0 alone: ``shown=1``)."""
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
