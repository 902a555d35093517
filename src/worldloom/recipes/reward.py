"""The reward recipe: a Bradley–Terry reward model on preference pairs.

    worldloom tune reward runs/sft data.path=data/prefs/train.jsonl name=rm

The run's model gets a value head (``model.value_head``: a scalar from the last hidden state);
the reward of a prompt + response is that scalar at the row's last token (the stop text
included), and the loss is -log σ(r(chosen) - r(rejected)). With ``lora.rank`` >= 1 the adapters
and the new head train. The held-out figures: the loss and the pair accuracy (how often the
chosen response gets the higher reward), in ``tune_eval.json``. `worldloom tune ppo ... reward=RM_RUN`
uses it.
"""

from __future__ import annotations

from pathlib import Path

import torch

from ..io import write_json
from ..losses.align import bradley_terry_loss
from ..tune.common import PairTask, evaluate_tuned, resume_tuned, run_tuned
from . import Recipe
from .text import load

TRAIN_DEFAULTS = {"max_steps": 300, "batch_size": 16, "lr": 5e-4, "min_lr": 5e-5, "warmup_steps": 20, "eval_interval": 50,
                  "eval_batches": 8, "log_interval": 10, "precision": "fp32", "weight_decay": 0.0}


def last_values(values: torch.Tensor, last: torch.Tensor) -> torch.Tensor:
    """values (N, T), last (N,) -> each row's value at its last token (N,)."""
    return values.gather(1, last.unsqueeze(1)).squeeze(1)


def objective(out, batch):
    r = last_values(out.values, batch["last"])
    B = r.shape[0] // 2
    return bradley_terry_loss(r[:B], r[B:])


class RewardTask(PairTask):
    shift = False  # the reward model reads the whole row

    def __init__(self, cfg, run_dir: Path, resuming: bool):
        super().__init__(cfg, run_dir, resuming)
        self.objective = objective

    def model_sizes(self) -> dict:
        return {**super().model_sizes(), "value_head": True}


@torch.no_grad()
def pair_accuracy(model, task: RewardTask) -> float:
    model.eval()
    right = n = 0
    for b in task.val_batches(32):
        r = last_values(model(b["input"]).values, b["last"])
        B = r.shape[0] // 2
        right, n = right + int((r[:B] > r[B:]).sum()), n + B
    return right / max(n, 1)


def after(summary: dict, run_dir: Path, log=print) -> dict:
    """The held-out pair accuracy of the trained reward model -> tune_eval.json."""
    from ..run import load_run

    run = load_run(run_dir)
    acc = pair_accuracy(run.model, RewardTask(run.cfg, run_dir, resuming=True))
    write_json(Path(run_dir) / "tune_eval.json", {"pair_accuracy": acc})
    log(f"held-out pairs: the chosen response gets the higher reward in {acc:.1%}")
    return {**summary, "pair_accuracy": acc}


RECIPE = Recipe("reward", "a Bradley-Terry reward model (value head) on preference pairs", RewardTask, run_tuned,
                resume_tuned, load, evaluate_tuned, model_fields=("vocab_size", "value_head"))
