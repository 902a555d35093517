"""The orpo recipe: SFT and preference alignment in one stage, no reference model (Hong et al. 2024).

    worldloom tune orpo runs/base data.path=data/prefs/train.jsonl name=orpo

L = the chosen responses' cross-entropy + ``orpo.lam`` x -log σ(log odds(chosen) - log odds(rejected)),
the odds from per-token mean log-probabilities (``worldloom.losses.align.orpo_loss``). The held-out
loss is that total over the held-out pairs.
"""

from __future__ import annotations

from pathlib import Path

from ..losses.align import orpo_loss, sequence_logprobs
from ..tune.common import PairTask, evaluate_tuned, resume_tuned, run_tuned
from . import Recipe
from .text import load

TRAIN_DEFAULTS = {"max_steps": 400, "batch_size": 16, "lr": 1e-3, "min_lr": 1e-4, "warmup_steps": 20, "eval_interval": 100,
                  "eval_batches": 8, "log_interval": 10, "precision": "fp32", "weight_decay": 0.0}


class ORPOTask(PairTask):
    def __init__(self, cfg, run_dir: Path, resuming: bool):
        super().__init__(cfg, run_dir, resuming)
        lam = cfg.orpo.lam

        def objective(out, batch):
            total, n = sequence_logprobs(out.logits, batch["target"], batch["weight"])
            B = total.shape[0] // 2
            nll = -total[:B].sum() / n[:B].sum().clamp(min=1)  # the chosen responses' token-level cross-entropy
            mean = total / n.clamp(min=1)
            return orpo_loss(nll, mean[:B], mean[B:], lam)

        self.objective = objective


RECIPE = Recipe("orpo", "SFT + odds-ratio preference optimisation in one stage (no reference)", ORPOTask, run_tuned,
                resume_tuned, load, evaluate_tuned)
