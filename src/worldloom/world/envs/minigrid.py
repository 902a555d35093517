"""MiniGrid and BabyAI (the `minigrid` package): symbolic egocentric views, a mission, 7 actions."""

from __future__ import annotations

import gymnasium as gym
import numpy as np

from ...errors import EnvError
from .base import EnvAdapter, QuietReset


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
