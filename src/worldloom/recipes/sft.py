"""The sft recipe: supervised fine-tuning of a run on instruction rows, the loss on responses only.

    worldloom tune sft runs/base data.path=data/instr/train.jsonl lora.rank=8 name=sft

Rows (``worldloom.tune.data.read_instructions``): prompt + response, or chat messages. Several
rows are packed into each context-long training row (whole rows only; a row never starts
mid-way); only the response tokens (stop included) are scored. The held-out loss is the
response-token loss over every held-out row, each alone; at the end, the held-out rows that
name a task are answered greedily and scored by the task's checker (``tune_eval.json``).
"""

from __future__ import annotations

from pathlib import Path

import torch

from ..losses import language_model_loss
from ..tune.common import TunedTask, evaluate_tuned, padded, resume_tuned, response_weights, run_tuned
from . import Recipe
from .text import load

TRAIN_DEFAULTS = {"max_steps": 400, "batch_size": 16, "lr": 1e-3, "min_lr": 1e-4, "warmup_steps": 20, "eval_interval": 100,
                  "eval_batches": 8, "log_interval": 10, "precision": "fp32", "weight_decay": 0.0}


class SFTTask(TunedTask):
    def __init__(self, cfg, run_dir: Path, resuming: bool):
        super().__init__(cfg, run_dir, resuming)
        from ..tune.data import read_instructions

        rows = read_instructions(cfg.data.path, cfg.tune.prompt_format, cfg.tune.stop)
        self.train_rows, self.val_rows = self.split(rows)
        self.train = [self.encode(r["prompt"], r["response"], r.get("rendered", False)) for r in self.train_rows]
        self.val = [self.encode(r["prompt"], r["response"], r.get("rendered", False)) for r in self.val_rows]
        self.objective = language_model_loss

    def batch(self, batch_size: int, gen: torch.Generator) -> dict:
        """batch_size rows of context + 1 tokens, each packed with random whole examples until the next does not fit."""
        T = self.cfg.model.context + 1
        seqs, weights = [], []
        for _ in range(batch_size):
            ids, w = [], []
            while True:
                e = self.train[int(torch.randint(len(self.train), (1,), generator=gen))]
                if ids and len(ids) + len(e.ids) > T:
                    break
                ids, w = ids + e.ids, w + response_weights(e)
            seqs.append(ids[:T])
            weights.append(w[:T])
        return padded(seqs, weights)

    @torch.no_grad()
    def val_loss(self, model, precision: str, device) -> float:
        """Mean cross-entropy of every held-out row's response tokens, each row alone."""
        from ..losses import next_token_loss
        from ..model import model_inputs
        from ..runtime import autocast

        was = model.training
        model.eval()
        nats, count = 0.0, 0.0
        bs = self.cfg.train.batch_size
        for i in range(0, len(self.val), bs):
            rows = self.val[i : i + bs]
            b = {k: v.to(device) for k, v in padded([e.ids for e in rows], [response_weights(e) for e in rows]).items()}
            with autocast(precision, device):
                logits = model(**model_inputs(b)).logits
            n = float(b["weight"].sum())
            nats, count = nats + float(next_token_loss(logits, b["target"], b["weight"])) * n, count + n
        model.train(was)
        return nats / max(count, 1.0)

    def describe(self) -> str:
        tokens = sum(len(e.ids) - e.start for e in self.train)
        return (f"{len(self.train):,} instruction rows ({tokens:,} response tokens), {len(self.val):,} held out, "
                f"vocab {self.tokenizer.vocab_size}")


RECIPE = Recipe("sft", "supervised fine-tuning of a run on instruction rows (loss on responses)", SFTTask, run_tuned,
                resume_tuned, load, evaluate_tuned)
