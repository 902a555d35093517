"""What the learned observation tokenizers (images, audio) share on disk: a small autoencoder's
weights in safetensors beside a JSON of what rebuilds it, in one folder (a run's ``stream/`` or
the tokenizer's own folder)."""

from __future__ import annotations

from pathlib import Path
from typing import Callable

from ..errors import CheckpointError
from ..io import load_tensors, read_json, save_tensors, write_json


def save_learned(folder: Path, model, meta: dict, meta_name: str, weights_name: str) -> None:
    """``model``'s weights and ``meta`` into ``folder`` (both files written atomically)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    save_tensors(folder / weights_name, model.state_dict())
    write_json(folder / meta_name, meta)


def load_learned(folder: Path, meta_name: str, weights_name: str, what: str, build: Callable[[dict], object]):
    """(model, meta) from ``folder``: ``build(meta)`` makes the module, the weights must fit it exactly;
    CheckpointError naming ``what`` (e.g. "image tokenizer") otherwise."""
    folder = Path(folder)
    if not (folder / meta_name).is_file() or not (folder / weights_name).is_file():
        raise CheckpointError(f"{folder} holds no {what} ({meta_name} and {weights_name})")
    meta = read_json(folder / meta_name, what)
    model = build(meta)
    missing, unexpected = model.load_state_dict(load_tensors(folder / weights_name), strict=False)
    if missing or unexpected:
        raise CheckpointError(f"{folder / weights_name} does not match its {what} config (missing {missing[:3]}, "
                              f"unexpected {unexpected[:3]})")
    return model, meta
