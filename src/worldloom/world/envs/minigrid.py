"""MiniGrid and BabyAI (the `minigrid` package): symbolic egocentric views, a mission, 7 actions.

Observations are streamed by the grid tokenizer (``worldloom.tokenize.GridTokenizer``), drawn by
MiniGrid's own renderer, and returned by an imagined environment as MiniGrid returns them
(``image``, ``direction``, ``mission``).
"""

from __future__ import annotations

import string

import gymnasium as gym
import numpy as np
from gymnasium import spaces

from ...errors import EnvError
from ...tokenize import GridTokenizer
from .base import EnvAdapter, QuietReset

try:  # the BabyAI levels' expert (worldloom.world.data.collect plays and labels with it)
    from minigrid.utils.baby_ai_bot import BabyAIBot
except ImportError:  # MiniGridAdapter raises the actionable EnvError
    BabyAIBot = None


class MiniGridAdapter(EnvAdapter):
    """MiniGrid and BabyAI: a 7x7x3 egocentric symbolic view, a direction, a mission, 7 actions."""

    kind = "minigrid"
    prefixes = ("MiniGrid-", "BabyAI-")
    place_rule = "minigrid"

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

    @property
    def gym_id(self) -> str:
        """The registered gymnasium id this adapter makes (a view of it, e.g. ``rgb:``, may name it differently)."""
        return self.env_id

    def make(self, render_mode: str | None = None) -> gym.Env:
        return QuietReset(gym.make(self.gym_id, render_mode=render_mode))

    def observe(self, obs: dict) -> dict[str, np.ndarray]:
        return {
            "image": np.asarray(obs["image"], dtype=np.uint8),
            "direction": np.asarray(obs["direction"], dtype=np.uint8),
        }

    def mission(self, obs: dict) -> str:
        return str(obs.get("mission", ""))

    def max_steps(self, env: gym.Env) -> int:
        return int(env.unwrapped.max_steps)

    @property
    def view(self) -> int:
        return self.obs_fields["image"][0][0]

    def obs_tokenizer(self, meta: dict | None = None) -> GridTokenizer:
        view = int(meta["obs_fields"]["image"]["shape"][0]) if meta is not None else self.view
        return GridTokenizer(view)

    def env_obs(self, fields: dict[str, np.ndarray], mission: str) -> dict:
        return {"image": np.array(fields["image"], np.uint8, copy=True), "direction": int(fields["direction"]),
                "mission": mission}

    def observation_space(self) -> spaces.Dict:
        return spaces.Dict({
            "image": spaces.Box(low=0, high=255, shape=(self.view, self.view, 3), dtype=np.uint8),
            "direction": spaces.Discrete(4),
            "mission": spaces.Text(max_length=1024, min_length=0, charset=string.printable),
        })

    def render(self, fields: dict[str, np.ndarray], tile_size: int = 16) -> np.ndarray:
        """The egocentric view (V, V, 3) -> RGB (V*tile, V*tile, 3) uint8, drawn by MiniGrid's own renderer
        the way ``MiniGridEnv.get_pov_render`` draws the agent's view: the agent sits at (V//2, V-1)
        facing up, visible cells highlighted."""
        from minigrid.core.grid import Grid

        image = np.asarray(fields["image"], np.uint8)
        if image.ndim != 3 or image.shape[0] != image.shape[1] or image.shape[2] != 3:
            raise ValueError(f"expected an egocentric view of shape (V, V, 3), got {image.shape}")
        view = image.shape[0]
        grid, vis_mask = Grid.decode(image)
        return grid.render(tile_size, agent_pos=(view // 2, view - 1), agent_dir=3, highlight_mask=vis_mask)

    @staticmethod
    def cell_names() -> tuple[dict[int, str], dict[int, str]]:
        """MiniGrid's names of a cell's object and colour indices (``image[..., 0]``, ``image[..., 1]``)."""
        from minigrid.core.constants import IDX_TO_COLOR, IDX_TO_OBJECT

        return dict(IDX_TO_OBJECT), dict(IDX_TO_COLOR)

    def novel_objects(self, episodes: list) -> list[np.ndarray | None]:
        """Replays each episode from its seed and actions and maps every visible view cell to its
        place in the grid (minigrid's ``relative_coords``); an object is any cell that is neither
        empty nor wall. An episode whose replay does not reproduce its stored observations gets None."""
        return self._per_episode(episodes, self._novel)

    def seen_cells(self, episodes: list, shown: int | None = None) -> list[np.ndarray | None]:
        """For each Episode, (T+1, V, V) bool over the view cells ``image[vx, vy]`` of o_0..o_T: the
        cell's place in the grid was shown (visible, not "unseen") by an earlier REAL observation
        o_0..o_{t-1} of the episode (with ``shown=n``: by one of o_0..o_{min(t, n)-1}). Places outside
        the grid are never counted; o_0 has none. By replay, as ``novel_objects``; None where the
        replay does not reproduce the episode."""
        if shown is not None and shown < 1:
            raise ValueError(f"shown counts the real observations given, at least 1; got {shown}")
        return self._per_episode(episodes, lambda env, ep: self._seen(env, ep, shown))

    def _per_episode(self, episodes: list, fn) -> list:
        env = self.make()
        try:
            return [fn(env, ep) for ep in episodes]
        finally:
            env.close()

    @staticmethod
    def _places(env: gym.Env, ep) -> list[dict] | None:
        """Replays ep: for o_0..o_T, grid place (x, y) -> view cell (vx, vy) of every in-grid place the
        view covers (minigrid's ``get_view_exts`` + ``relative_coords``); None if the replay diverges."""
        obs, _ = env.reset(seed=int(ep.seed))
        u = env.unwrapped
        W, H = u.grid.width, u.grid.height

        def places() -> dict:
            x0, y0, x1, y1 = u.get_view_exts()  # the square of grid cells the view can cover
            out = {}
            for x, y in ((x, y) for x in range(max(x0, 0), min(x1, W)) for y in range(max(y0, 0), min(y1, H))):
                rc = u.relative_coords(x, y)
                if rc is not None:
                    out[(x, y)] = (int(rc[0]), int(rc[1]))
            return out

        if not np.array_equal(obs["image"], ep.obs["image"][0]):
            return None
        out = [places()]
        for t, a in enumerate(ep.action):
            obs, *_ = env.step(int(a))
            if not np.array_equal(obs["image"], ep.obs["image"][t + 1]):
                return None
            out.append(places())
        return out

    @staticmethod
    def _visible(place: dict, img: np.ndarray) -> dict:
        """grid place -> object index of the places a view shows (not "unseen")."""
        from minigrid.core.constants import OBJECT_TO_IDX

        unseen = OBJECT_TO_IDX["unseen"]
        return {p: int(img[v][0]) for p, v in place.items() if img[v][0] != unseen}

    @classmethod
    def _novel(cls, env: gym.Env, ep) -> np.ndarray | None:
        from minigrid.core.constants import OBJECT_TO_IDX

        plain = (OBJECT_TO_IDX["unseen"], OBJECT_TO_IDX["empty"], OBJECT_TO_IDX["wall"])
        places = cls._places(env, ep)
        if places is None:
            return None
        seen = set(cls._visible(places[0], ep.obs["image"][0]))
        counts = np.zeros(ep.length, np.int64)
        for t in range(ep.length):
            vis = cls._visible(places[t + 1], ep.obs["image"][t + 1])
            counts[t] = sum(1 for k, v in vis.items() if k not in seen and v not in plain)
            seen.update(vis)
        return counts

    @classmethod
    def _seen(cls, env: gym.Env, ep, shown: int | None = None) -> np.ndarray | None:
        places = cls._places(env, ep)
        if places is None:
            return None
        V = ep.obs["image"].shape[1]
        mask = np.zeros((ep.length + 1, V, V), bool)
        seen: set = set()
        for t, place in enumerate(places):
            for p, v in place.items():
                mask[t][v] = p in seen
            if shown is None or t < shown:
                seen.update(cls._visible(place, ep.obs["image"][t]))
        return mask
