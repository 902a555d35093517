"""The Task protocol: what one recipe's training needs from its data, and nothing else.

The training loop (``train/loop.py``) runs any object with these members; a recipe
(``worldloom.recipes``) says which task class it trains. A task never writes into the run's
config: the model sizes its data implies (vocabulary, slots, ...) are returned by
``model_sizes`` and the loop builds the resolved model config from them.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable, Protocol, runtime_checkable

import torch

from ..losses import LossOutput


@runtime_checkable
class Task(Protocol):
    objective: Callable[..., LossOutput]  # (ModelOutput, batch) -> LossOutput, a function of worldloom.losses

    def model_sizes(self) -> dict:
        """ModelConfig fields fixed by the data (e.g. {"vocab_size": 65}), applied before the model is built."""

    def batch(self, batch_size: int, gen: torch.Generator) -> dict:
        """A training batch: "input" and "target" (B, T) and any other key the objective or the model reads."""

    def val_loss(self, model, precision: str, device) -> float:
        """The held-out next-token loss, on the same fixed batches every call."""

    def save(self, run_dir: Path) -> None:
        """Write what a run folder needs besides the weights (tokenizers, stream layout)."""

    def describe(self) -> str:
        """One line about the data, for the start-of-run message."""

    # Optional: ``prepare_model(model)`` is called on the freshly built model before it is moved,
    # wrapped or restored (the tuning recipes load their base run's weights and add LoRA
    # adapters there); a model with frozen parameters checkpoints only its trained ones.
    # Optional: ``before_step(model, step)`` is called before each optimizer step (a talk run with a vision
    # prefix freezes its backbone for its first steps there).
