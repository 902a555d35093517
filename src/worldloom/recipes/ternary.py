"""The ternary recipe: BitNet b1.58 quantisation-aware fine-tuning of a text run (`worldloom quantize RUN --bits 1.58`).

The run's model is its base's with every backbone linear a ``BitLinear`` (worldloom.quant.layers):
ternary weights and 8-bit activations in the forward, straight-through gradients into the latent
full-precision weights, which start as the base's. It trains on the base's own text file and
tokenizer (the same held-out tail), through the one training loop; when training ends the last
checkpoint is replaced by the packed ternary weights (``worldloom.quant.pack_run``). Loading,
`generate` and `eval` are the text recipe's.
"""

from __future__ import annotations

from pathlib import Path

from ..config import RunConfig
from ..tune.base import base_dir
from . import Recipe
from .text import TextTask, evaluate, load


class TernaryTask(TextTask):
    """The text task on the base run's text, with the base's tokenizer; the model made ternary first."""

    def __init__(self, cfg: RunConfig, run_dir: Path, resuming: bool):
        source = Path(run_dir) if resuming else base_dir(cfg)
        super().__init__(cfg, source, resuming=True)  # resuming=True: the tokenizer is read from `source`, not learned

    def prepare_model(self, model) -> None:
        from ..quant import start_qat

        start_qat(model, self.cfg)

    def describe(self) -> str:
        return f"ternary QAT (BitNet b1.58) of {self.cfg.tune.base}: " + super().describe()


def run(cfg: RunConfig, progress: bool = True, log=print) -> dict:
    from ..quant import pack_run
    from ..train import train

    summary = train(cfg, progress=progress, log=log)
    pack_run(Path(summary["run_dir"]), log)
    return summary


def resume(run_dir: Path, overrides: list[str], progress: bool = True, log=print) -> dict:
    from ..quant import pack_run
    from ..train import train

    summary = train(resume=Path(run_dir), overrides=overrides, progress=progress, log=log)
    pack_run(Path(run_dir), log)
    return summary


RECIPE = Recipe("ternary", "BitNet b1.58 ternary QAT fine-tuning of a text run (worldloom quantize --bits 1.58)",
                TernaryTask, run, resume, load, evaluate, objectives=("next", "masked", "combined"))  # the base's objective
