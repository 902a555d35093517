"""The medusa recipe: Medusa heads over a frozen text run, trained on the run's own generations.

    worldloom tune medusa runs/big heads=4 name=big-medusa [medusa.samples=512 medusa.length=96 train.*=...]

Self-distillation (Medusa-1 with the base frozen; Cai et al. 2024): ``medusa.samples`` prompts of
``medusa.prompt`` tokens are cut at random places of the base's training text (its ``data.path``,
the part before its held-out tail), and the base continues each by ``medusa.length`` tokens
(greedy by default: the decoding the heads are meant to speed up), batched, with the KV cache.
The heads learn what the base *says*, not what the text says: head k at position t is scored
against the base's token t+k+2, on generated tokens only. The last ``medusa.val_fraction`` of the
generations is held out: the held-out loss, and at the end each head's top-1 accuracy there
(``tune_eval.json``: ``head_accuracy``, head 1 first; chance is 1/vocabulary), and the tokens per
forward pass of greedy Medusa decoding of a few held-out prompts (``tokens_per_forward``).

The generations are made when the model is prepared (before any update) and kept in the run
folder (``distill.safetensors`` + ``distill.json``), so ``--resume`` trains on the same ones.
The run folder holds the heads only (checkpoints: ``medusa.*``) and names its base and the
base's weights hash, as every tuned run does; `load_run` gives the base with the heads attached.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from ..adapters.medusa import head_logits, medusa_loss, prepare_medusa
from ..errors import ConfigError, DataError
from ..io import load_tensors, save_tensors, write_json
from ..run import TOKENIZER_DIR
from ..tokenize import TextTokenizer
from ..tune.common import resume_tuned, run_tuned
from . import Recipe
from .text import load

TRAIN_DEFAULTS = {"max_steps": 400, "batch_size": 16, "lr": 1e-3, "min_lr": 1e-4, "warmup_steps": 20, "eval_interval": 100,
                  "eval_batches": 8, "log_interval": 10, "precision": "fp32", "weight_decay": 0.0}
DISTILL = "distill"  # distill.safetensors (train, val: (N, prompt + length) ids) and distill.json (what made them)
GEN_BATCH = 64  # generations decoded together


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
        self.model = self.train = self.val = None

    # ---------------------------------------------------------------- Task protocol

    def model_sizes(self) -> dict:
        return {"vocab_size": self.tokenizer.vocab_size}

    def prepare_model(self, model) -> None:
        """The frozen base with new heads; the generations to learn from (made now, or read back)."""
        prepare_medusa(model, self.cfg)
        self.model = model
        rows = self._cached() or self._generate(model)
        self.train, self.val = rows

    def objective(self, out, batch):
        return medusa_loss(head_logits(self.model, out.hidden), batch["target"], batch["weight"])

    def batch(self, batch_size: int, gen: torch.Generator) -> dict:
        return self._rows(self.train[torch.randint(len(self.train), (batch_size,), generator=gen)])

    def _rows(self, ids: torch.Tensor) -> dict:
        """(B, P + G) ids -> input/target (B, P + G - 1) and weight: 1 where the target was generated."""
        w = torch.zeros(ids.shape[0], ids.shape[1] - 1)
        w[:, self.cfg.medusa.prompt - 1 :] = 1.0
        return {"input": ids[:, :-1], "target": ids[:, 1:], "weight": w}

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
        save_tensors(Path(run_dir) / f"{DISTILL}.safetensors", {"train": self.train, "val": self.val})
        write_json(Path(run_dir) / f"{DISTILL}.json", self._key())  # written last: the pair is complete

    def describe(self) -> str:
        mc = self.cfg.medusa
        return (f"{mc.heads} Medusa heads over the frozen base, {len(self.train):,} generations of the base "
                f"({mc.prompt} prompt + {self.length} generated tokens, {'greedy' if not mc.temperature else f'T={mc.temperature:g}'}), "
                f"{len(self.val):,} held out, vocab {self.tokenizer.vocab_size}")

    # ---------------------------------------------------------------- self-distillation data

    def _key(self) -> dict:
        mc = self.cfg.medusa
        return {"base_hash": self.cfg.tune.base_hash, "samples": mc.samples, "prompt": mc.prompt, "length": self.length,
                "temperature": mc.temperature, "seed": mc.seed, "val_fraction": mc.val_fraction}

    def _cached(self) -> tuple[torch.Tensor, torch.Tensor] | None:
        meta = self.run_dir / f"{DISTILL}.json"
        if not meta.is_file() or json.loads(meta.read_text()) != self._key():
            return None
        t = load_tensors(self.run_dir / f"{DISTILL}.safetensors", "self-distillation data")
        return t["train"], t["val"]

    def _generate(self, model) -> tuple[torch.Tensor, torch.Tensor]:
        """Prompts cut from the base's training text, continued by the base: (train, val) (N, P + G) ids."""
        from ..decode import SamplingConfig, generate_ids
        from .text import prepare_text

        mc = self.cfg.medusa
        try:
            text = prepare_text(self.cfg, self.tokenizer)[0].train
        except DataError as e:
            raise DataError(f"{e} (Medusa's prompts are cut from the base's training text: give data.path=FILE)") from None
        if len(text) <= mc.prompt:
            raise DataError(f"{self.cfg.data.path}: {len(text)} training tokens are too few for prompts of {mc.prompt}")
        g = torch.Generator().manual_seed(mc.seed)
        starts = torch.randint(len(text) - mc.prompt, (mc.samples,), generator=g)
        prompts = torch.stack([text[s : s + mc.prompt] for s in starts.tolist()])  # (N, P)
        was = model.training
        model.eval()
        out = []
        for i in range(0, mc.samples, GEN_BATCH):
            p = prompts[i : i + GEN_BATCH]
            sc = SamplingConfig(max_new_tokens=self.length, temperature=mc.temperature, seed=mc.seed + i)
            new = torch.stack(list(generate_ids(model, p.tolist(), sc)), 1).cpu()  # (b, G)
            out.append(torch.cat([p, new.clone()], 1))
        model.train(was)
        rows = torch.cat(out)
        n_val = max(1, round(mc.samples * mc.val_fraction))
        return rows[:-n_val], rows[-n_val:]


def after(summary: dict, run_dir: Path, log=print) -> dict:
    """After training: each head's top-1 accuracy on the held-out generations -> tune_eval.json."""
    from ..run import load_run

    run = load_run(run_dir)
    task = MedusaTask(run.cfg, run_dir, resuming=True)
    task.model = run.model
    task.train, task.val = task._cached() or (None, None)
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
