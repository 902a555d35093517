"""The medusa recipe: Medusa heads over a frozen text run, trained on the run's own generations.

    worldloom tune medusa runs/big heads=4 name=big-medusa [medusa.samples=512 medusa.length=96 train.*=...]

Self-distillation (Medusa-1 with the base frozen; Cai et al. 2024): ``medusa.samples`` prompts of
``medusa.prompt`` tokens cut from the base's training text, continued by the base for
``medusa.length`` tokens (`worldloom.tune.distill`: made when the model is prepared, kept in the
run folder, so ``--resume`` trains on the same ones). Head k at position t is scored against the
base's token t+k+2, on generated tokens only. The last ``medusa.val_fraction`` of the generations
is held out: the held-out loss, and at the end each head's top-1 accuracy there
(``tune_eval.json``: ``head_accuracy``, head 1 first; chance is 1/vocabulary), and the tokens per
forward pass of greedy Medusa decoding of a few held-out prompts (``tokens_per_forward``).

The run folder holds the heads only (checkpoints: ``medusa.*``) and names its base and the
base's weights hash, as every tuned run does; `load_run` gives the base with the heads attached.
"""

from __future__ import annotations

from pathlib import Path

import torch

from ..adapters.medusa import head_logits, medusa_loss, prepare_medusa
from ..errors import ConfigError, DataError
from ..io import write_json
from ..run import TOKENIZER_DIR
from ..tokenize import TextTokenizer
from ..tune.common import resume_tuned, run_tuned
from ..tune.distill import DISTILL, Generations, rows
from . import Recipe
from .text import load

TRAIN_DEFAULTS = {"max_steps": 400, "batch_size": 16, "lr": 1e-3, "min_lr": 1e-4, "warmup_steps": 20, "eval_interval": 100,
                  "eval_batches": 8, "log_interval": 10, "precision": "fp32", "weight_decay": 0.0}


def tune_overrides(run: Path, overrides: list[str]) -> list[str]:
    """`tune medusa RUN heads=K ...`: ``heads=K`` is ``medusa.heads=K``; the base's text (data.path,
    data.val_fraction) is where the prompts come from unless given."""
    from ..run import read_run_config

    bcfg = read_run_config(run)
    if bcfg.recipe == "medusa":
        raise ConfigError(f"{run} is already a Medusa run; tune medusa its base run ({bcfg.tune.base})")
    out = [f"medusa.{o}" if o.split("=", 1)[0] == "heads" else o for o in overrides]
    given = {o.split("=", 1)[0] for o in out}
    carried = [f"data.{k}={getattr(bcfg.data, k)}" for k in ("path", "val_fraction") if f"data.{k}" not in given]
    return carried + out


class MedusaTask:
    """Rows = prompt + the base's continuation; objective = the heads' mean cross-entropy on the continuation."""

    def __init__(self, cfg, run_dir: Path, resuming: bool):
        self.cfg, self.run_dir = cfg, Path(run_dir)
        if not cfg.tune.base:
            raise DataError("recipe medusa tunes another run: start it with `worldloom tune medusa RUN heads=4 name=NAME`")
        mc = cfg.medusa
        if mc.prompt >= cfg.model.context:
            raise ConfigError(f"medusa.prompt ({mc.prompt}) must be shorter than the model's context ({cfg.model.context})")
        self.length = min(mc.length, cfg.model.context + 1 - mc.prompt)  # a row's inputs fit the context
        from ..tune.base import base_dir

        source = self.run_dir if resuming else base_dir(cfg)
        self.tokenizer = TextTokenizer.load(source / TOKENIZER_DIR)
        self.gens = Generations(mc, cfg.tune.base_hash, self.length)
        self.model = self.train = self.val = None

    # ---------------------------------------------------------------- Task protocol

    def model_sizes(self) -> dict:
        return {"vocab_size": self.tokenizer.vocab_size}

    def prepare_model(self, model) -> None:
        """The frozen base with new heads; the generations to learn from (made now, or read back)."""
        prepare_medusa(model, self.cfg)
        self.model = model
        self.train, self.val = self.gens.cached(self.run_dir) or self.gens.generate(model, self.cfg, self.tokenizer)

    def objective(self, out, batch):
        return medusa_loss(head_logits(self.model, out.hidden), batch["target"], batch["weight"])

    def batch(self, batch_size: int, gen: torch.Generator) -> dict:
        return self._rows(self.train[torch.randint(len(self.train), (batch_size,), generator=gen)])

    def _rows(self, ids: torch.Tensor) -> dict:
        return rows(ids, self.cfg.medusa.prompt)

    @torch.no_grad()
    def val_loss(self, model, precision: str, device) -> float:
        """The heads' mean cross-entropy over every held-out generation."""
        return self.held_out(model, precision, device)[0]

    def held_out(self, model, precision: str, device) -> tuple[float, list[float]]:
        """(mean loss, each head's top-1 accuracy) over every held-out generation."""
        from ..model import model_inputs
        from ..runtime import autocast

        was = model.training
        model.eval()
        K = self.cfg.medusa.heads
        loss, acc, n = 0.0, [0.0] * K, 0
        for i in range(0, len(self.val), self.cfg.train.batch_size):
            b = {k: v.to(device) for k, v in self._rows(self.val[i : i + self.cfg.train.batch_size]).items()}
            with torch.no_grad(), autocast(precision, device):
                out = self.objective(model(**model_inputs(b)), b)
            rows = b["input"].shape[0]
            loss, n = loss + out.parts["loss"] * rows, n + rows
            acc = [a + out.parts.get(f"acc{k + 1}", 0.0) * rows for k, a in enumerate(acc)]
        model.train(was)
        return loss / max(n, 1), [a / max(n, 1) for a in acc]

    def save(self, run_dir: Path) -> None:
        self.tokenizer.save(Path(run_dir) / TOKENIZER_DIR)
        self.gens.save(run_dir, self.train, self.val)

    def describe(self) -> str:
        mc = self.cfg.medusa
        return (f"{mc.heads} Medusa heads over the frozen base, {len(self.train):,} generations of the base "
                f"({mc.prompt} prompt + {self.length} generated tokens, {'greedy' if not mc.temperature else f'T={mc.temperature:g}'}), "
                f"{len(self.val):,} held out, vocab {self.tokenizer.vocab_size}")


def after(summary: dict, run_dir: Path, log=print) -> dict:
    """After training: each head's top-1 accuracy on the held-out generations -> tune_eval.json."""
    from ..run import load_run

    run = load_run(run_dir)
    task = MedusaTask(run.cfg, run_dir, resuming=True)
    task.model = run.model
    task.train, task.val = task.gens.cached(run_dir) or (None, None)
    if task.val is None:
        raise DataError(f"{run_dir} lacks its self-distillation data ({DISTILL}.safetensors)")
    loss, acc = task.held_out(run.model, "fp32", next(run.model.parameters()).device)
    res = {"heads": run.cfg.medusa.heads, "val_loss": loss, "head_accuracy": acc, "rows": len(task.val),
           "chance": 1.0 / run.cfg.model.vocab_size, "tokens_per_forward": _tokens_per_forward(run.model, task)}
    write_json(Path(run_dir) / "tune_eval.json", res)
    log("held-out generations, top-1 accuracy per head (tokens 2.. ahead): "
        + ", ".join(f"+{k + 2} {a:.1%}" for k, a in enumerate(acc)) + f" (chance {res['chance']:.1%}); greedy Medusa "
        f"decoding of their prompts: {res['tokens_per_forward']:.2f} tokens per forward pass")
    summary.update(res)
    return summary


def _tokens_per_forward(model, task: MedusaTask, prompts: int = 8) -> float:
    """Greedy Medusa decoding of up to 8 held-out prompts, one at a time: tokens per forward pass (a count,
    not a timing: the speed-up's upper bound)."""
    from ..decode import SamplingConfig
    from ..inference.medusa import medusa_ids
    from ..inference.speculative import SpecStats

    stats = SpecStats()
    sc = SamplingConfig(max_new_tokens=task.length, temperature=0.0)
    for row in task.val[:prompts]:
        for _ in medusa_ids(model, [row[: task.cfg.medusa.prompt].tolist()], sc, stats=stats):
            pass
    return stats.tokens_per_forward


def evaluate(args, run) -> int:
    from ..tune.evaluate import evaluate_tuned

    return evaluate_tuned(args, run)


RECIPE = Recipe("medusa", "Medusa heads over a frozen text run, trained on its own generations", MedusaTask, run_tuned,
                resume_tuned, load, evaluate)
