"""Places: the step-skip input of an observation cell reads what was last seen at the same place.

An egocentric view moves with the agent: after a turn, the object that filled one cell of the view
fills another, and the plain step-skip input (the same cell one step earlier, worldloom.model) hands
the model the wrong neighbour. Measured on the BabyAI main job, the model then drops every object it
had seen when it turns (BENCHMARKS.md, "World model v2"). With ``stream.places=true`` the stream
layout asks a *place rule* which world place each cell of the next view shows, from the previous
view and the action alone (causal: both are already in the stream), and the skip input of that
cell becomes the last id seen at that place anywhere earlier in the visible stream (0 when the place
was never seen there). The model input is unchanged in shape; only the ids it is given change.

A rule knows an environment's geometry; today one exists, ``minigrid``: a 7x7 view with the agent at
the bottom middle facing up, an absolute direction token, and the actions left, right, forward
(forward moves one cell when the cell in front is empty, floor, goal, lava or an open door). It
tracks the agent's place by dead reckoning from the first view of the window, so it needs no
ground truth: it works the same on recorded, real and imagined streams. The agent's own cell shows
what it carries, so it is remembered as "carried", not as a place.
"""

from __future__ import annotations

import numpy as np

# MiniGrid's codebook (minigrid.core.constants; checked against it in tests/test_places.py)
_UNSEEN, _EMPTY, _FLOOR, _DOOR, _GOAL, _LAVA = 0, 1, 3, 4, 8, 9
_OPEN = 0
_LEFT, _RIGHT, _FORWARD = 0, 1, 2
_DIR_VEC = np.array([[1, 0], [0, 1], [-1, 0], [0, -1]], np.int64)  # direction 0..3 -> (dx, dy), y down


class MiniGridPlaces:
    """The place rule of MiniGrid's egocentric grid views (``GridTokenizer`` ids, view 7, MiniGrid actions)."""

    name = "minigrid"

    def __init__(self, obs, obs_offset: int, action_offset: int):
        self.tok, self.obs_offset, self.action_offset = obs, obs_offset, action_offset
        v = obs.view
        self.view = v
        self.cells = v * v  # the first `cells` tokens of a frame show places (the direction follows)
        vy, vx = np.divmod(np.arange(v * v), v)  # the cells row by row: y, then x
        self.ahead, self.side = (v - 1) - vy, vx - v // 2  # cells ahead of the agent, cells to its right
        self.agent_cell = (v - 1) * v + v // 2
        self.front_cell = (v - 2) * v + v // 2
        self.per_object = obs.n_colors * obs.n_states

    def _cells(self, frame: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Stream ids of a frame's cells (B, v*v) -> object and state codes."""
        code = frame[:, : self.view ** 2] - self.obs_offset
        return code // self.per_object, code % self.tok.n_states

    def _direction(self, frame: np.ndarray) -> np.ndarray:
        return np.clip(frame[:, self.view ** 2] - self.obs_offset - self.tok.n_cell_codes, 0, 3)

    def walkable_ahead(self, frame: np.ndarray) -> np.ndarray:
        """(B,) whether `forward` moves the agent, read from the cell in front of it."""
        obj, state = self._cells(frame)
        front, front_state = obj[:, self.front_cell], state[:, self.front_cell]
        return np.isin(front, (_EMPTY, _FLOOR, _GOAL, _LAVA)) | ((front == _DOOR) & (front_state == _OPEN))

    def places(self, pos: np.ndarray, direction: np.ndarray) -> np.ndarray:
        """World places (B, v*v, 2) of the view's cells for agents at pos (B, 2) facing direction (B,)."""
        f = _DIR_VEC[direction]  # (B, 2)
        r = np.stack([-f[:, 1], f[:, 0]], axis=1)  # the agent's right
        return pos[:, None, :] + f[:, None, :] * self.ahead[None, :, None] + r[:, None, :] * self.side[None, :, None]

    def remembered(self, steps: np.ndarray, step_len: int) -> np.ndarray:
        """steps (B, n) stream ids of whole or partial steps, the first a frame's first token -> (B, n + step_len)
        target-aligned ids: at the position of cell c of frame t+1, the last id seen (in frames 0..t) at the place
        that cell shows, 0 where none; the agent's own cell gets the previous frame's (what it carries). Positions
        that are not cells of a frame after the first are 0."""
        B, n = steps.shape
        v2 = self.view ** 2
        out = np.zeros((B, n + 2 * step_len), np.int64)
        n_acted = max(0, (n - self.view ** 2 - 1 + step_len - 1) // step_len)  # frames t whose action a_t is in steps
        if n_acted == 0:
            return out[:, : n + step_len]
        reach = n_acted + self.view + 1
        size = 2 * reach + 1
        memory = np.zeros((B, size, size), np.int64)  # id + 1 last seen at each place (0: never), origin at the middle
        rows = np.arange(B)[:, None]
        pos = np.full((B, 2), reach, np.int64)
        for t in range(n_acted):
            frame = steps[:, t * step_len : t * step_len + v2 + 1]
            action = steps[:, t * step_len + v2 + 1] - self.action_offset
            direction = self._direction(frame)
            where = self.places(pos, direction)
            obj, _ = self._cells(frame)
            seen = obj != _UNSEEN
            seen[:, self.agent_cell] = False
            wx, wy = where[..., 0], where[..., 1]
            cur = memory[rows, wx, wy]
            memory[rows, wx, wy] = np.where(seen, frame[:, :v2] + 1, cur)
            moved = (action == _FORWARD) & self.walkable_ahead(frame)
            pos = pos + _DIR_VEC[direction] * moved[:, None]
            turned = (direction + np.where(action == _LEFT, -1, np.where(action == _RIGHT, 1, 0))) % 4
            nxt = self.places(pos, turned)
            recalled = memory[rows, nxt[..., 0], nxt[..., 1]] - 1
            recalled[:, self.agent_cell] = frame[:, self.agent_cell]
            start = (t + 1) * step_len
            out[:, start : start + v2] = np.maximum(recalled, 0)
        return out[:, : n + step_len]


PLACE_RULES = {MiniGridPlaces.name: MiniGridPlaces}


def place_rule(name: str, obs, obs_offset: int, action_offset: int):
    """The place rule called ``name`` for a layout's observation tokenizer and offsets."""
    if name not in PLACE_RULES:
        raise ValueError(f"unknown place rule {name!r} (known: {', '.join(PLACE_RULES)})")
    return PLACE_RULES[name](obs, obs_offset, action_offset)
