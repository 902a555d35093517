"""A recipe defined outside the package, for tests/test_recipes.py: counting modulo V.

Each training row is a run of consecutive numbers modulo V from a random start; the held-out
rows start at other numbers. A model learns "next = this + 1" in a few dozen steps.
"""

from __future__ import annotations

from pathlib import Path

import torch

from worldloom.evaluate import sampled_loss
from worldloom.losses import language_model_loss
from worldloom.recipes import Recipe

V = 11


class CountingData:
    def batch(self, split: str, batch_size: int, context: int, gen: torch.Generator) -> dict:
        start = torch.randint(0, V, (batch_size, 1), generator=gen)
        if split == "val":
            start = (start * 7 + 3) % V
        seq = (start + torch.arange(context + 1)) % V  # (B, T + 1)
        return {"input": seq[:, :-1], "target": seq[:, 1:]}


class CountingTask:
    objective = staticmethod(language_model_loss)

    def __init__(self, cfg, run_dir: Path, resuming: bool):
        self.cfg, self.data = cfg, CountingData()

    def model_sizes(self) -> dict:
        return {"vocab_size": V}

    def batch(self, batch_size: int, gen: torch.Generator) -> dict:
        return self.data.batch("train", batch_size, self.cfg.model.context, gen)

    def val_loss(self, model, precision: str, device) -> float:
        tc = self.cfg.train
        return sampled_loss(model, self.data, self.cfg.model.context, tc.batch_size, tc.eval_batches, precision, device)

    def save(self, run_dir: Path) -> None:
        (Path(run_dir) / "counting.txt").write_text(f"modulo {V}\n")

    def describe(self) -> str:
        return f"counting modulo {V}"


def _unused(*args, **kwargs):
    raise NotImplementedError


RECIPE = Recipe("toy", "counting modulo 11", CountingTask, _unused, _unused, lambda run_dir: (V, {}), _unused)
