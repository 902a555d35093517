"""Reading MiniGrid cells back out of pixels: how much of the symbolic world a picture keeps.

A MiniGrid RGB view (``rgb:`` ids) is drawn from the symbolic view at 8 pixels per cell, so
each 8x8 tile shows one cell: an (object, colour, state) triple, or the agent itself at the
bottom centre (drawn over what it stands on). ``CellReader`` learns one prototype tile per
label from frames whose symbolic views are known (the mean of its tiles; real tiles of one
label are identical), and reads a picture by giving each tile the label of its nearest
prototype. On real frames this reads every cell right (tested); on a tokenizer's
reconstructions the share read right is the tokenizer's **cell accuracy** (issue target:
>= 99.5% on held-out frames). A label never seen while building the reader cannot be read and
counts as wrong.
"""

from __future__ import annotations

import numpy as np

from ..world.envs.pixels import CELL_PIXELS, PIXELS


def cell_labels(image: np.ndarray) -> np.ndarray:
    """Symbolic views (N, V, V, 3), indexed [x, y] -> labels (N, V, V) indexed [y, x] (as pixels are).
    A cell's label is its triple as one number; the agent's cell (x = V//2, y = V-1) gets 1 << 16 added."""
    image = np.asarray(image, np.int64)
    labels = (image[..., 0] * 256 + image[..., 1]) * 256 + image[..., 2]  # (N, x, y)
    labels = labels.transpose(0, 2, 1).copy()  # (N, y, x)
    v = labels.shape[1]
    labels[:, v - 1, v // 2] += 1 << 24
    return labels


def label_views(labels: np.ndarray) -> np.ndarray:
    """Labels (N, V, V) [y, x] -> symbolic views (N, V, V, 3) uint8 indexed [x, y]: ``cell_labels`` undone."""
    labels = np.asarray(labels, np.int64) & ((1 << 24) - 1)  # the agent's mark off
    triple = np.stack([labels >> 16, (labels >> 8) & 255, labels & 255], axis=-1)  # (N, y, x, 3)
    return triple.transpose(0, 2, 1, 3).astype(np.uint8)


def tiles(pixels: np.ndarray) -> np.ndarray:
    """(N, V*8, V*8, 3) uint8 -> (N, V, V, 8*8*3) float32, tile [y, x] flattened."""
    n, h, w, _ = pixels.shape
    t = pixels.reshape(n, h // CELL_PIXELS, CELL_PIXELS, w // CELL_PIXELS, CELL_PIXELS, 3)
    return t.transpose(0, 1, 3, 2, 4, 5).reshape(n, h // CELL_PIXELS, w // CELL_PIXELS, -1).astype(np.float32)


class CellReader:
    def __init__(self, frames: dict[str, np.ndarray]):
        labels = cell_labels(frames["image"]).reshape(-1)
        flat = tiles(frames[PIXELS]).reshape(labels.size, -1)
        self.labels, inverse = np.unique(labels, return_inverse=True)
        sums = np.zeros((len(self.labels), flat.shape[1]), np.float64)
        np.add.at(sums, inverse, flat)
        self.prototypes = (sums / np.bincount(inverse)[:, None]).astype(np.float32)  # (L, 192)
        self._sq = (self.prototypes ** 2).sum(1)

    def read(self, pixels: np.ndarray, chunk: int = 4096) -> np.ndarray:
        """Pictures (N, V*8, V*8, 3) -> labels (N, V, V) [y, x]: each tile's nearest prototype."""
        t = tiles(pixels)
        flat = t.reshape(-1, t.shape[-1])
        out = np.empty(len(flat), np.int64)
        for i in range(0, len(flat), chunk):
            x = flat[i:i + chunk]
            d = self._sq[None, :] - 2.0 * x @ self.prototypes.T  # |x|^2 is the same for every prototype
            out[i:i + chunk] = self.labels[d.argmin(1)]
        return out.reshape(t.shape[:3])

    def views(self, pixels: np.ndarray) -> np.ndarray:
        """Pictures (N, V*8, V*8, 3) -> the symbolic views (N, V, V, 3) [x, y] they show (nearest prototypes)."""
        return label_views(self.read(pixels))

    def accuracy(self, pixels: np.ndarray, image: np.ndarray) -> dict:
        """Share of cells read right; also of the cells that are not empty floor or unseen (the objects)."""
        truth, got = cell_labels(image), self.read(pixels)
        obj = np.asarray(image).transpose(0, 2, 1, 3)[..., 0] >= 2  # MiniGrid object index: 0 unseen, 1 empty
        right = truth == got
        return {"cells": float(right.mean()), "object_cells": float(right[obj].mean()) if obj.any() else None,
                "frames_exact": float(right.reshape(len(right), -1).all(1).mean()),
                "unknown_labels": int((~np.isin(truth, self.labels)).sum())}
