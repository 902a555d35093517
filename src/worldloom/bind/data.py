"""Items as id rows for the model: ``[view tokens | caption words | actions]`` (``BindModel.split``).

The view goes through the world model's grid tokenizer (49 cells, then the direction); the caption
through a word-level ``TextTokenizer`` learned from the training captions, as the world stream's
missions are (kept in the run folder's ``tokenizer/``; a word never seen in training is ``[UNK]``); each segment is right-padded with its own pad id (the text tokenizer's size, and
``N_ACTIONS``).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from ..errors import ConfigError
from ..tokenize import GridTokenizer, TextTokenizer
from .items import PAD_ACTION
from .model import N_ACTIONS

TOKENIZER_DIR = "tokenizer"


def text_tokenizer(run_dir: Path, captions: np.ndarray) -> TextTokenizer:
    """The run's word tokenizer: read back from the run folder, or learned from ``captions``."""
    folder = Path(run_dir) / TOKENIZER_DIR
    if (folder / "tokenizer.json").is_file():
        return TextTokenizer.load(folder)
    return TextTokenizer.train("word", "\n".join(str(c) for c in captions))


def encode_rows(items: dict[str, np.ndarray], tok: TextTokenizer, view: int, text_len: int) -> torch.Tensor:
    """Items -> (N, view*view + 1 + text_len + action_len) int64 rows."""
    grid = GridTokenizer(view).encode_batch(items)  # (N, view*view + 1)
    ids = tok.encode_batch([str(t) for t in items["text"]])
    longest = max(len(i) for i in ids)
    if longest > text_len:
        raise ConfigError(f"a caption is {longest} words, longer than bind.text_len={text_len}; give bind.text_len={longest} or more")
    text = np.full((len(ids), text_len), tok.vocab_size, np.int64)  # (N, text_len), padded with the pad id
    for i, row in enumerate(ids):
        text[i, : len(row)] = row
    actions = items["actions"].astype(np.int64)
    actions[actions == PAD_ACTION] = N_ACTIONS
    return torch.from_numpy(np.concatenate([grid, text, actions], axis=1))
