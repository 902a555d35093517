"""The dpo recipe: direct preference optimisation (``dpo.loss=ipo``: IPO) of a run on preference pairs.

    worldloom tune dpo runs/sft data.path=data/prefs/train.jsonl dpo.beta=0.1 name=dpo

The reference is the starting model (the base run, its own adapters merged). Its
log-probabilities of every pair are computed once, when the run starts (``prepare_model``,
before any update or restored checkpoint), so no second model is kept in memory; a resumed run
computes the same numbers again from the same base. Sums over the response tokens for DPO,
per-token means for IPO (``worldloom.losses.align``). The held-out loss is the DPO loss over the
held-out pairs; at the end, the held-out prompts that name a task are answered greedily and
scored by the checker. ``dpo.sft_coef`` > 0 adds that many times the chosen responses'
cross-entropy (RPO, Pang et al. 2024): plain DPO lowers the likelihood of chosen and rejected
alike, which on small models was measured to wreck answers it did not touch (BENCHMARKS.md).
"""

from __future__ import annotations

from pathlib import Path

import torch

from ..losses.align import dpo_loss, sequence_logprobs
from ..losses.base import LossOutput
from ..tune.common import PairTask, evaluate_tuned, resume_tuned, run_tuned
from . import Recipe
from .text import load

TRAIN_DEFAULTS = {"max_steps": 300, "batch_size": 16, "lr": 2e-4, "min_lr": 2e-5, "warmup_steps": 20, "eval_interval": 50,
                  "eval_batches": 8, "log_interval": 10, "precision": "fp32", "weight_decay": 0.0}


def pair_logprobs(logits: torch.Tensor, batch: dict, mean: bool) -> torch.Tensor:
    """Per-row log-probability of the response tokens (2B,): sums, or per-token means."""
    total, n = sequence_logprobs(logits, batch["target"], batch["weight"])
    return total / n.clamp(min=1) if mean else total


class DPOTask(PairTask):
    def __init__(self, cfg, run_dir: Path, resuming: bool):
        super().__init__(cfg, run_dir, resuming)
        dc = cfg.dpo
        self.mean = dc.loss == "ipo"

        def objective(out, batch):
            total, n = sequence_logprobs(out.logits, batch["target"], batch["weight"])
            logp = total / n.clamp(min=1) if self.mean else total
            B = logp.shape[0] // 2
            ref = batch["ref"]
            res = dpo_loss(logp[:B], logp[B:], ref[:B], ref[B:], dc.beta, dc.loss)
            if dc.sft_coef:  # RPO: keep the chosen responses likely while the margin grows
                nll = -total[:B].sum() / n[:B].sum().clamp(min=1)
                res = LossOutput(res.total + dc.sft_coef * nll, {**res.parts, "nll_chosen": float(nll.detach())})
            return res

        self.objective = objective

    @torch.no_grad()
    def prepare_model(self, model) -> None:
        """The base's weights (and adapters); then the reference log-probabilities of every pair, from that model."""
        super().prepare_model(model)
        model.eval()
        self.ref = {split: self._reference(model, pairs) for split, pairs in (("train", self.train), ("val", self.val))}
        model.train()

    def _reference(self, model, pairs) -> torch.Tensor:
        """(N, 2) log-probabilities (chosen, rejected) of the pairs, in fp32."""
        out = []
        for i in range(0, len(pairs), 32):
            b = self.pair_batch(pairs[i : i + 32])
            logp = pair_logprobs(model(b["input"]).logits, b, self.mean)
            B = logp.shape[0] // 2
            out.append(torch.stack([logp[:B], logp[B:]], dim=1))
        return torch.cat(out)

    def extras(self, b: dict, pairs: torch.Tensor, split: str) -> dict:
        ref = self.ref[split][pairs]
        b["ref"] = torch.cat([ref[:, 0], ref[:, 1]])
        return b


RECIPE = Recipe("dpo", "direct preference optimisation on preference pairs (dpo.loss=ipo: IPO)", DPOTask, run_tuned,
                resume_tuned, load, evaluate_tuned)
