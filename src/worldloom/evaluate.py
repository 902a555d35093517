"""Held-out evaluation of a language model: loss, perplexity, bits per character."""

from __future__ import annotations

import math

import torch

from .data.text import TextData
from .losses import next_token_loss
from .model import model_inputs
from .runtime import autocast


@torch.no_grad()
def sampled_loss(model, data, context: int, batch_size: int, n_batches: int, precision: str, device, seed: int = 0) -> float:
    """Mean held-out loss over a fixed set of random batches (the same set every call).

    ``data`` is anything with ``batch("val", batch_size, context, generator)`` (TextData,
    EpisodeData); the loss is the weighted next-token cross-entropy (every objective's ``loss`` part).
    """
    was_training = model.training
    model.eval()
    gen = torch.Generator().manual_seed(seed)
    total = 0.0
    for _ in range(n_batches):
        batch = {k: v.to(device) for k, v in data.batch("val", batch_size, context, gen).items()}
        with autocast(precision, device):
            logits = model(**model_inputs(batch)).logits
            total += next_token_loss(logits, batch["target"], batch.get("weight")).item()
    model.train(was_training)
    return total / n_batches


@torch.no_grad()
def full_heldout(model, data: TextData, context: int, batch_size: int, precision: str, device, progress=None) -> dict:
    """Score every held-out target once (non-overlapping windows of `context` tokens)."""
    model.eval()
    nats, count = 0.0, 0.0
    for batch in data.windows("val", context, batch_size):
        batch = {k: v.to(device) for k, v in batch.items()}
        with autocast(precision, device):
            logits = model(batch["input"]).logits
        w = batch["weight"]
        nats += next_token_loss(logits, batch["target"], w).item() * w.sum().item()
        count += w.sum().item()
        if progress is not None:
            progress(int(count))
    loss = nats / count
    return {
        "loss": loss,
        "perplexity": math.exp(loss),
        "bits_per_char": nats / math.log(2) / data.val_chars,
        "nats_per_char": nats / data.val_chars,
        "tokens": int(count),
        "chars": data.val_chars,
    }
