"""The observation-tokenizer protocol, and the registry of observation tokenizers by kind.

An observation tokenizer turns the stored fields of a batch of observations (as the
environment adapter names them, ``worldloom.world.envs``) into a fixed number of tokens per
observation, and back. The stream layout (``worldloom.world.stream``) takes any of them: it
only reads ``n_tokens``, ``vocab_size`` and ``token_ranges()`` and calls the batch forms.

The environment adapter declares which one it uses (``EnvAdapter.obs_tokenizer(meta)``); the
run folder records its ``kind`` (``stream/stream.json``) next to the tokenizer's own files, and
``load_obs_tokenizer(kind, folder)`` finds the class again through ``OBS_TOKENIZERS``. The grid
tokenizer (MiniGrid cells, ``grid.py``) registers itself as ``"grid"``; an image tokenizer
(VQ, FSQ) registers its own kind the same way.
"""

from __future__ import annotations

from pathlib import Path
from typing import ClassVar, Protocol, runtime_checkable

import numpy as np

from ..errors import CheckpointError


@runtime_checkable
class ObsTokenizer(Protocol):
    kind: ClassVar[str]  # registry name, recorded in the run folder ("grid", "vq", ...)
    fields: tuple[str, ...]  # the observation fields it reads, e.g. ("image", "direction")

    @property
    def n_tokens(self) -> int:
        """Tokens per observation."""

    @property
    def vocab_size(self) -> int:
        """Distinct ids (0 .. vocab_size-1) over all positions."""

    def token_ranges(self) -> list[tuple[int, int]]:
        """[lo, hi) of the ids each of the n_tokens positions may take."""

    def encode_batch(self, fields: dict[str, np.ndarray]) -> np.ndarray:
        """Fields with a leading axis N -> ids (N, n_tokens) int64."""

    def decode_batch(self, ids: np.ndarray) -> dict[str, np.ndarray]:
        """Ids (N, n_tokens) -> fields with a leading axis N (ids outside a position's range are clamped)."""

    def save(self, folder: Path) -> None:
        """Write the tokenizer's files into ``folder``."""

    @classmethod
    def load(cls, folder: Path) -> "ObsTokenizer":
        """Read what ``save`` wrote (CheckpointError if it is missing or damaged)."""


OBS_TOKENIZERS: dict[str, type] = {}
LAZY = {"image": "worldloom.vision.tokenizer", "audio": "worldloom.audio.tokenizer"}  # kinds whose module (and its heavier imports) loads on first use


def register_obs_tokenizer(cls: type) -> type:
    """Class decorator: make ``cls`` loadable by its ``kind``."""
    if not cls.kind or cls.kind in OBS_TOKENIZERS:
        raise ValueError(f"observation tokenizer kind {cls.kind!r} is empty or registered twice")
    OBS_TOKENIZERS[cls.kind] = cls
    return cls


def load_obs_tokenizer(kind: str, folder: Path) -> ObsTokenizer:
    """The observation tokenizer of the recorded ``kind`` saved in ``folder``."""
    if kind not in OBS_TOKENIZERS and kind in LAZY:
        import importlib

        importlib.import_module(LAZY[kind])  # registers the kind
    cls = OBS_TOKENIZERS.get(kind)
    if cls is None:
        raise CheckpointError(f"{folder} holds an observation tokenizer of kind {kind!r}, which this worldloom "
                              f"does not know (known: {', '.join(sorted(OBS_TOKENIZERS))})")
    return cls.load(Path(folder))
