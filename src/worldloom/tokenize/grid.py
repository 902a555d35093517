"""MiniGrid symbolic observations as tokens: one token per cell, one for the agent's direction.

A MiniGrid cell is a triple (object, color, state) of small integers (``minigrid.core.constants``:
11 object types, 6 colors, 3 door states). The codebook gives every triple its own token,

    cell token = (object * n_colors + color) * n_states + state      (11 * 6 * 3 = 198 tokens)

so any observation the environment can produce round-trips exactly; triples that never occur
(a grey goal, an "open" ball) simply keep untrained embeddings. The 7x7 view is read row by
row from the far row (y = 0) to the agent's row (y = 6), x from left to right, then the
direction (0..3) follows as token ``198 + direction``. One observation = 50 tokens.

It implements the observation-tokenizer protocol (``base.py``) over the fields ``image`` and
``direction`` and is registered as kind ``"grid"``; the MiniGrid adapter declares it.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from ..errors import CheckpointError
from ..io import read_json, write_json
from .base import register_obs_tokenizer


def _minigrid_sizes() -> tuple[int, int, int]:
    from minigrid.core.constants import COLOR_TO_IDX, OBJECT_TO_IDX, STATE_TO_IDX

    return len(OBJECT_TO_IDX), len(COLOR_TO_IDX), len(STATE_TO_IDX)


@register_obs_tokenizer
class GridTokenizer:
    """Protocol (``base.ObsTokenizer``): encode_batch(fields) -> ids (N, n_tokens), decode_batch(ids)
    -> fields, n_tokens, vocab_size, token_ranges(), save(dir), load(dir).

    The fields are ``image`` (N, W, H, 3) uint8 and ``direction`` (N,) 0..3; ``encode`` / ``decode``
    are the same for one observation (``direction`` an int).
    """

    kind = "grid"
    modality = "grid"
    fields = ("image", "direction")

    def __init__(self, view: int = 7, n_objects: int | None = None, n_colors: int | None = None, n_states: int | None = None):
        if n_objects is None:
            n_objects, n_colors, n_states = _minigrid_sizes()
        self.view = view
        self.n_objects, self.n_colors, self.n_states = n_objects, n_colors, n_states
        self.n_cell_codes = n_objects * n_colors * n_states
        self.n_cells = view * view

    @property
    def n_tokens(self) -> int:
        """Tokens per observation: every cell, then the direction."""
        return self.n_cells + 1

    @property
    def vocab_size(self) -> int:
        return self.n_cell_codes + 4

    def token_ranges(self) -> list[tuple[int, int]]:
        """[lo, hi) of the ids each of the n_tokens positions may take."""
        return [(0, self.n_cell_codes)] * self.n_cells + [(self.n_cell_codes, self.n_cell_codes + 4)]

    # -- batch forms (the ones the stream uses)
    def encode_batch(self, fields: dict) -> np.ndarray:
        """Fields image (N, W, H, 3), direction (N,) -> ids (N, n_tokens) int64 (other fields are ignored)."""
        image, direction = np.asarray(fields["image"]), fields["direction"]
        if image.ndim != 4 or image.shape[1:] != (self.view, self.view, 3):
            raise ValueError(f"expected images of shape (N, {self.view}, {self.view}, 3), got {image.shape}")
        obj, col, st = (image[..., k].astype(np.int64) for k in range(3))
        if obj.max(initial=0) >= self.n_objects or col.max(initial=0) >= self.n_colors or st.max(initial=0) >= self.n_states:
            raise ValueError("observation holds a cell outside the MiniGrid codebook (object, color or state too large)")
        cells = (obj * self.n_colors + col) * self.n_states + st  # (N, W, H) indexed [x, y]
        cells = cells.transpose(0, 2, 1).reshape(len(image), -1)  # row by row: y, then x
        d = np.asarray(direction, dtype=np.int64).reshape(-1, 1)
        if d.min(initial=0) < 0 or d.max(initial=0) > 3:
            raise ValueError("direction must be in 0..3")
        return np.concatenate([cells, self.n_cell_codes + d], axis=1)

    def decode_batch(self, ids: np.ndarray) -> dict[str, np.ndarray]:
        """ids (N, n_tokens) -> fields image (N, W, H, 3) uint8, direction (N,) uint8 (as episodes store them).

        Ids outside a position's range (a model can emit anything) are clamped into it.
        """
        ids = np.asarray(ids, dtype=np.int64)
        cells = np.clip(ids[:, : self.n_cells], 0, self.n_cell_codes - 1)
        state = cells % self.n_states
        color = (cells // self.n_states) % self.n_colors
        obj = cells // (self.n_states * self.n_colors)
        image = np.stack([obj, color, state], axis=-1).reshape(len(ids), self.view, self.view, 3)
        image = image.transpose(0, 2, 1, 3).astype(np.uint8)  # back to [x, y]
        direction = np.clip(ids[:, self.n_cells] - self.n_cell_codes, 0, 3).astype(np.uint8)
        return {"image": image, "direction": direction}

    # -- protocol, one observation
    def encode(self, obs: dict) -> np.ndarray:
        return self.encode_batch({"image": np.asarray(obs["image"])[None], "direction": np.asarray([obs["direction"]])})[0]

    def decode(self, ids) -> dict:
        fields = self.decode_batch(np.asarray(ids)[None])
        return {"image": fields["image"][0], "direction": int(fields["direction"][0])}

    def save(self, folder: Path) -> None:
        write_json(Path(folder) / "grid_tokenizer.json", {
            "modality": "grid", "view": self.view, "n_objects": self.n_objects,
            "n_colors": self.n_colors, "n_states": self.n_states})

    @classmethod
    def load(cls, folder: Path) -> "GridTokenizer":
        meta = read_json(Path(folder) / "grid_tokenizer.json", "grid tokenizer")
        try:
            return cls(int(meta["view"]), int(meta["n_objects"]), int(meta["n_colors"]), int(meta["n_states"]))
        except (KeyError, TypeError, ValueError):
            raise CheckpointError(f"grid tokenizer file in {folder} is incomplete; the run folder is damaged") from None

