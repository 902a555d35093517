"""Autoregressive generation with a KV cache: streaming, batched prompts, stop strings (the sampling
itself is worldloom.inference.sampling).

Prompts of different lengths are left-padded; the cache masks the padding and starts each
row's rotary positions at its first real token, so a batched row decodes like the same
prompt alone. When a sequence fills the model's context, the cache is rebuilt from the
last half-context of tokens (one prefill every context/2 tokens) and decoding goes on.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Iterator

import torch

from .inference.sampling import check_sampling, sample


@dataclass
class SamplingConfig:
    max_new_tokens: int = 200
    temperature: float = 1.0  # 0 = greedy
    top_k: int = 0  # 0 = off
    top_p: float = 1.0  # 1 = off
    seed: int | None = None

    def __post_init__(self):
        if self.max_new_tokens < 0:
            raise ValueError(f"max_new_tokens must be >= 0, got {self.max_new_tokens}")
        check_sampling(self.temperature, self.top_k, self.top_p)


def left_pad(prompts: list[list[int]], pad_id: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Token lists -> (B, L) left-padded ids and (B,) pad counts."""
    if not prompts or any(len(p) == 0 for p in prompts):
        raise ValueError("every prompt needs at least one token")
    L = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), L), pad_id, dtype=torch.long)
    pad = torch.empty(len(prompts), dtype=torch.long)
    for i, p in enumerate(prompts):
        ids[i, L - len(p):] = torch.as_tensor(p, dtype=torch.long)
        pad[i] = L - len(p)
    return ids, pad


@torch.inference_mode()
def generate_ids(model, prompts: list[list[int]], sc: SamplingConfig, use_cache: bool = True, autocast_ctx=None,
                 compile: bool = False, drafter=None, draft_tokens: int = 4, stats=None,
                 medusa: bool = False) -> Iterator[torch.Tensor]:
    """Yield the next token of every row, (B,), max_new_tokens times.

    ``compile=True`` runs each one-token step through ``torch.compile`` of the model's
    fixed-shape ``decode_step`` (one graph per batch shape, compiled on first use and kept
    on the model): slower to start (~20 s on CPU), faster per token.
    ``drafter`` (`inference.speculative`: a draft model or prompt lookup) makes it speculative:
    up to ``draft_tokens`` proposed tokens verified per forward pass, the same greedy output,
    the same distribution when sampling; ``stats`` (a `SpecStats`) counts what happened.
    ``medusa=True`` decodes with the model's Medusa heads (`inference.medusa.medusa_ids`).
    """
    if medusa:
        if compile or not use_cache or drafter is not None:
            raise ValueError("Medusa decoding runs on the cache, uncompiled, without another drafter")
        from .inference.medusa import medusa_ids

        yield from medusa_ids(model, prompts, sc, stats=stats, autocast_ctx=autocast_ctx)
        return
    if drafter is not None:
        if compile or not use_cache:
            raise ValueError("speculative decoding runs on the cache, uncompiled")
        from .inference.speculative import speculative_ids

        yield from speculative_ids(model, prompts, sc, drafter, draft_tokens, autocast_ctx, stats)
        return
    ctx_len = model.cfg.context
    gen = torch.Generator().manual_seed(sc.seed) if sc.seed is not None else None
    device = next(model.parameters()).device
    seq, pad = left_pad(prompts)
    seq, pad = seq.to(device), pad.to(device)
    B = seq.shape[0]

    amp = autocast_ctx or contextlib.nullcontext

    def run(ids, cache):
        with amp():
            return model(ids, cache).logits[:, -1]

    def prefill(keep: int):
        """A fresh cache over the last `keep` tokens; returns (cache, logits of the last one)."""
        window = seq[:, -keep:]
        window_pad = (pad - (seq.shape[1] - window.shape[1])).clamp(min=0)
        cache = model.new_cache(B, ctx_len, window_pad)
        return cache, run(window, cache)

    step = _compiled_step(model) if compile and use_cache else None

    def run_step(tok, cache):
        with amp():
            logits = step(tok, cache, torch.tensor(cache.length, device=device))
        cache.length += 1
        return logits

    cache, logits = prefill(min(seq.shape[1], ctx_len))
    for _ in range(sc.max_new_tokens):
        nxt = sample(logits, sc.temperature, top_k=sc.top_k, top_p=sc.top_p, generator=gen)
        if stats is not None:
            stats.tokens += 1
            stats.forwards += 1
        yield nxt
        seq = torch.cat([seq, nxt[:, None]], dim=1)
        if not use_cache:
            cache, logits = prefill(min(seq.shape[1], ctx_len))
        elif cache.length >= ctx_len:
            cache, logits = prefill(max(1, ctx_len // 2))
        elif step is not None:
            logits = run_step(nxt[:, None], cache)
        else:
            logits = run(nxt[:, None], cache)


def _compiled_step(model):
    """torch.compile of model.decode_step, made once per model."""
    if not getattr(model, "supports_decode_step", False):
        raise ValueError(f"compiled decoding needs a fixed-shape decode_step, which this model's backbone "
                         f"({getattr(model.cfg, 'backbone', type(model).__name__)}, ffn {getattr(model.cfg, 'ffn', '?')}) "
                         f"does not have (attention-only stacks without MoE do); use compile=False")
    if getattr(model, "_compiled_decode_step", None) is None:
        model._compiled_decode_step = torch.compile(model.decode_step, dynamic=False)
    return model._compiled_decode_step


def generate(model, tokenizer, prompts: list[str], sc: SamplingConfig, stop: list[str] | None = None, autocast_ctx=None,
             compile: bool = False, **speculative) -> list[str]:
    """Completions (without the prompt) for a batch of text prompts (``speculative``: `generate_ids`'
    drafter, draft_tokens, stats)."""
    outs = [""] * len(prompts)
    for i, text in stream_batch(model, tokenizer, prompts, sc, stop, autocast_ctx, compile, **speculative):
        outs[i] += text
    return outs


def stream_batch(model, tokenizer, prompts: list[str] | list[list[int]], sc: SamplingConfig, stop: list[str] | None = None,
                 autocast_ctx=None, compile: bool = False, **speculative) -> Iterator[tuple[int, str]]:
    """Yield (row, new text) as tokens arrive; a row ends at its first stop string (excluded). A prompt
    is a text or its token ids (the agent encodes prompt and trace apart, as tuning did)."""
    from .inference.textstream import TextStream

    rows = [TextStream(tokenizer, stop) for _ in prompts]
    ids = [list(p) if isinstance(p, list) else tokenizer.encode(p).tolist() for p in prompts]
    for nxt in generate_ids(model, ids, sc, autocast_ctx=autocast_ctx, compile=compile, **speculative):
        for i, t in enumerate(nxt.tolist()):
            if not rows[i].stopped and (text := rows[i].push(t)):
                yield i, text
        if all(r.stopped for r in rows):
            return
    for i, r in enumerate(rows):  # flush what was held back at the end
        if text := r.flush():
            yield i, text
