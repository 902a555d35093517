"""Pixel environments: observations are RGB frames (field ``pixels``), as an image tokenizer reads them.

Three families, each an ``EnvAdapter`` (``base.py``):

- ``rgb:<MiniGrid or BabyAI id>`` (``MiniGridRGBAdapter``): the same levels, seen as the agent's
  egocentric view drawn by MiniGrid's renderer at 8 pixels per cell (7x7 cells -> 56x56x3).
  The symbolic ``image`` and ``direction`` are stored beside the pixels, so that what a model
  decodes from pixels can be checked cell by cell (``worldloom.vision.cells``); the BabyAI bot
  plays these levels as it plays the symbolic ones.
- ``crafter`` (``CrafterAdapter``, the ``crafter`` package): 64x64x3 frames, 17 actions, the
  achievements unlocked so far in ``info["achievements"]``. Crafter speaks the old gym API
  and its action space has no ``sample()``: the adapter wraps it as a gymnasium environment
  whose ``reset(seed=s)`` plays world ``s``.
- ``ALE/<game>-v5`` (``AtariAdapter``, ``ale-py``; the ROMs ship with it): frame skip 4 and
  sticky actions with probability 0.25 (the v5 defaults, Atari-100k practice), the minimal
  action set, frames resized to 64x64x3 (bilinear).

Pixel observations have no observation tokenizer of their own: an image tokenizer run
(``worldloom train tokenizer-vq``, or the tokenizer stage of a pixel world run,
``worldloom.vision.stage``) is what turns them into tokens.
"""

from __future__ import annotations

import string

import gymnasium as gym
import numpy as np
from gymnasium import spaces

from ...errors import EnvError
from .base import EnvAdapter
from .minigrid import MiniGridAdapter

PIXELS = "pixels"
CELL_PIXELS = 8  # MiniGrid RGB: pixels per cell side
FRAME = 64  # Crafter and Atari frames: FRAME x FRAME x 3


class _PixelAdapter(EnvAdapter):
    """What the pixel families share: a ``pixels`` field, drawn as itself."""

    def obs_tokenizer(self, meta: dict | None = None):
        raise EnvError(f"{self.env_id} has pixel observations: a world run streams them through an image tokenizer "
                       "run (stream.tokenizer=RUN, or one the world pipeline trains first: worldloom.vision.stage)")

    def render(self, fields: dict[str, np.ndarray], tile_size: int = 16) -> np.ndarray:
        """The frame itself, enlarged tile_size / 8 times by nearest neighbour (the GIFs' size of a cell)."""
        k = max(1, tile_size // CELL_PIXELS)
        return np.asarray(fields[PIXELS], np.uint8).repeat(k, axis=0).repeat(k, axis=1)

    def env_obs(self, fields: dict[str, np.ndarray], mission: str):
        return np.array(fields[PIXELS], np.uint8, copy=True)

    def observation_space(self) -> spaces.Box:
        return spaces.Box(0, 255, self.obs_fields[PIXELS][0], np.uint8)


class MiniGridRGBAdapter(_PixelAdapter, MiniGridAdapter):
    """MiniGrid's levels and bot (``MiniGridAdapter``) seen as pixels (``_PixelAdapter``: drawn as
    themselves, no observation tokenizer of their own)."""

    kind = "minigrid-rgb"
    prefixes = ("rgb:",)

    def __init__(self, env_id: str):
        super().__init__(env_id)
        side = self.view * CELL_PIXELS
        self.obs_fields = {PIXELS: ((side, side, 3), np.dtype(np.uint8)), **self.obs_fields}

    @property
    def gym_id(self) -> str:
        return self.env_id[len("rgb:"):]

    @classmethod
    def known_ids(cls) -> list[str]:
        return [f"rgb:{k}" for k in MiniGridAdapter.known_ids()]

    def observe(self, obs: dict) -> dict[str, np.ndarray]:
        fields = super().observe(obs)
        return {PIXELS: MiniGridAdapter.render(self, fields, CELL_PIXELS), **fields}

    def env_obs(self, fields: dict[str, np.ndarray], mission: str) -> dict:
        return {PIXELS: _PixelAdapter.env_obs(self, fields, mission), "mission": mission}

    def observation_space(self) -> spaces.Dict:
        return spaces.Dict({PIXELS: _PixelAdapter.observation_space(self),
                            "mission": spaces.Text(max_length=1024, min_length=0, charset=string.printable)})


class CrafterEnv(gym.Env):
    """``crafter.Env`` as a gymnasium environment: ``reset(seed=s)`` plays world s; ``info["achievements"]``."""

    metadata = {"render_modes": ["rgb_array"]}

    def __init__(self, size: int = FRAME, length: int = 10000, render_mode: str | None = None):
        import crafter

        self._env = crafter.Env(size=(size, size), length=length, seed=0)
        self.action_space = spaces.Discrete(len(self._env.action_names))
        self.observation_space = spaces.Box(0, 255, (size, size, 3), np.uint8)
        self.render_mode = render_mode
        self.length = length
        self._last = None

    def reset(self, *, seed: int | None = None, options=None):
        super().reset(seed=seed)
        if seed is not None:  # crafter seeds each world from (seed, episode number)
            self._env._seed, self._env._episode = int(seed), 0
        self._last = self._env.reset()
        return self._last, {"achievements": {}}

    def step(self, action):
        obs, reward, done, info = self._env.step(int(action))
        self._last = obs
        truncated = bool(done and info.get("discount", 1.0) == 1.0)  # time ran out, the player lives
        return obs, float(reward), bool(done and not truncated), truncated, info

    def render(self):
        return self._last


class CrafterAdapter(_PixelAdapter):
    kind = "crafter"
    prefixes = ("crafter",)

    def __init__(self, env_id: str):
        super().__init__(env_id)
        self._import_family()
        import crafter

        self.obs_fields = {PIXELS: ((FRAME, FRAME, 3), np.dtype(np.uint8))}
        self.action_names = tuple(crafter.constants.actions)
        self.achievements = tuple(sorted(crafter.constants.achievements))
        self.n_actions = len(self.action_names)

    @classmethod
    def handles(cls, env_id: str) -> bool:
        return env_id == "crafter"

    @classmethod
    def known_ids(cls) -> list[str]:
        return ["crafter"]

    @classmethod
    def _import_family(cls) -> None:
        try:
            import crafter  # noqa: F401
        except ImportError:
            raise EnvError("environment package 'crafter' is not installed; run `pip install crafter`") from None

    def make(self, render_mode: str | None = None) -> gym.Env:
        return CrafterEnv(render_mode=render_mode)

    def observe(self, obs) -> dict[str, np.ndarray]:
        return {PIXELS: np.asarray(obs, np.uint8)}

    def max_steps(self, env: gym.Env) -> int:
        return int(env.unwrapped.length)


def resize(frame: np.ndarray, size: int = FRAME) -> np.ndarray:
    """(H, W, 3) uint8 -> (size, size, 3) uint8, bilinear (Pillow)."""
    from PIL import Image

    return np.asarray(Image.fromarray(frame).resize((size, size), Image.BILINEAR), np.uint8)


class AtariAdapter(_PixelAdapter):
    kind = "atari"
    prefixes = ("ALE/",)

    def __init__(self, env_id: str):
        super().__init__(env_id)
        self._import_family()
        env = gym.make(env_id)
        try:
            self.action_names = tuple(env.unwrapped.get_action_meanings())
        finally:
            env.close()
        self.obs_fields = {PIXELS: ((FRAME, FRAME, 3), np.dtype(np.uint8))}
        self.n_actions = len(self.action_names)

    @classmethod
    def _import_family(cls) -> None:
        try:
            import ale_py
        except ImportError:
            raise EnvError("environment package 'ale-py' is not installed; run `pip install ale-py`") from None
        gym.register_envs(ale_py)

    def make(self, render_mode: str | None = None) -> gym.Env:
        return gym.make(self.env_id, frameskip=4, repeat_action_probability=0.25, full_action_space=False,
                        render_mode=render_mode)

    def observe(self, obs) -> dict[str, np.ndarray]:
        return {PIXELS: resize(np.asarray(obs, np.uint8))}

    def max_steps(self, env: gym.Env) -> int:
        return int(env.spec.max_episode_steps or 27000)  # 108,000 frames at frame skip 4
