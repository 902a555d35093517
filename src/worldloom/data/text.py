"""A text corpus as token ids: the last `val_fraction` of the file is held out.

The split is made on the raw text before tokenization, so the BPE vocabulary is learned
from the training part only and the held-out part is never seen in any form.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from ..errors import DataError


def read_corpus(path: str | Path) -> str:
    if not str(path):
        raise DataError("no corpus given: set data.path=<a UTF-8 text file>")
    p = Path(path)
    if not p.exists():
        raise DataError(f"data file not found: {p}")
    if not p.is_file():
        raise DataError(f"data.path must be a text file, got {_kind(p)}: {p}")
    try:
        text = p.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise DataError(f"data file {p} is not UTF-8 text (bad byte at offset {e.start})") from None
    except OSError as e:
        raise DataError(f"cannot read data file {p}: {e.strerror or e}") from None
    if not text.strip():
        raise DataError(f"data file {p} is empty")
    return text


def _kind(p: Path) -> str:
    """What a path that is not a regular file is, in words (a FIFO or device would block or read forever)."""
    if p.is_dir():
        return "a folder"
    if p.is_char_device() or p.is_block_device():
        return "a device"
    if p.is_fifo():
        return "a pipe"
    if p.is_socket():
        return "a socket"
    return "something that is not a regular file"


def split_text(text: str, val_fraction: float) -> tuple[str, str]:
    cut = int(len(text) * (1.0 - val_fraction))
    return text[:cut], text[cut:]


@dataclass
class TextData:
    train: torch.Tensor  # (N,) long
    val: torch.Tensor  # (M,) long
    val_chars: int  # characters in the held-out text, for bits per character

    def check_context(self, context: int, path: str) -> None:
        for name, ids in (("training", self.train), ("held-out", self.val)):
            if len(ids) < context + 1:
                raise DataError(
                    f"corpus {path} has {len(ids)} tokens in its {name} part, fewer than model.context+1 = {context + 1}; "
                    "use a longer file or a smaller model.context"
                )

    def batch(self, split: str, batch_size: int, context: int, generator: torch.Generator) -> dict:
        """Random windows: input ids (B, T) and the next-token targets (B, T)."""
        ids = self.train if split == "train" else self.val
        starts = torch.randint(len(ids) - context, (batch_size,), generator=generator)
        offsets = starts[:, None] + torch.arange(context + 1)  # (B, T+1)
        window = ids[offsets]
        return {"input": window[:, :-1], "target": window[:, 1:]}

    def windows(self, split: str, context: int, batch_size: int):
        """Batches of non-overlapping windows that score every target of the split once.

        The last window ends at the last token; its ``weight`` masks the targets that an
        earlier window already scored.
        """
        ids = self.val if split == "val" else self.train
        n_targets = len(ids) - 1
        starts = list(range(0, n_targets - context + 1, context))
        scored_to = starts[-1] + context if starts else 0
        tail = n_targets - scored_to
        if tail > 0:
            starts.append(n_targets - context)
        for i in range(0, len(starts), batch_size):
            rows = torch.tensor(starts[i : i + batch_size])
            window = ids[rows[:, None] + torch.arange(context + 1)]  # (B, T+1)
            weight = torch.ones(len(rows), context)
            if tail > 0 and i + batch_size >= len(starts):
                weight[-1, : context - tail] = 0.0
            yield {"input": window[:, :-1], "target": window[:, 1:], "weight": weight}
