"""The one sampler: next-token ids from logits, for text, actions and imagined observations.

    ids = sample(logits, temperature, top_k=0, top_p=1.0, allowed=None, generator=None)

``logits`` is (..., V), any leading batch shape; the result is a LongTensor (...). The steps,
in order:

1. ``allowed`` restricts the ids a row may take (every other id gets -inf): a ``(lo, hi)``
   range shared by every row, per-row ranges (an integer tensor or array (..., 2) broadcast
   against the leading shape, e.g. one range per observation position), or a boolean mask
   (..., V) of the allowed ids. `restrict` does this alone (the world runner's constrained
   logits and the stream layout's frame mask use it).
2. temperature 0 is greedy: the argmax of the (restricted) logits, nothing else applies.
3. otherwise the logits are divided by the temperature (in fp32); ``top_k`` > 0 keeps the k
   likeliest ids and every id tied with the k-th (as transformers' TopKLogitsWarper);
   ``top_p`` < 1 keeps the smallest set of likeliest ids whose probability reaches top_p;
   one id is drawn from the softmax of what is left (``torch.multinomial`` with
   ``generator``).

Bad settings (a temperature that is negative, nan or infinite; top_k < 0; top_p outside
(0, 1]) raise a one-line ``ValueError`` (`check_sampling`).
"""

from __future__ import annotations

import math

import numpy as np
import torch


def check_sampling(temperature: float, top_k: int = 0, top_p: float = 1.0) -> None:
    """ValueError (one line) unless temperature is finite and >= 0, top_k >= 0 and 0 < top_p <= 1."""
    if not math.isfinite(temperature) or temperature < 0:
        raise ValueError(f"temperature must be a finite number >= 0 (0 = greedy), got {temperature}")
    if top_k < 0:
        raise ValueError(f"top_k must be >= 0 (0 = off), got {top_k}")
    if not 0.0 < top_p <= 1.0:  # also refuses nan
        raise ValueError(f"top_p must be in (0, 1] (1 = off), got {top_p}")


def allowed_mask(allowed, n_ids: int, device: torch.device) -> torch.Tensor:
    """The boolean mask (..., n_ids) of the ids ``allowed`` permits: a mask as given, ranges compared."""
    t = allowed if isinstance(allowed, torch.Tensor) else torch.as_tensor(np.asarray(allowed))
    t = t.to(device)
    if t.dtype == torch.bool:
        return t
    if t.shape[-1:] != (2,):
        raise ValueError(f"allowed ranges must have a last axis of 2 (lo, hi), got shape {tuple(t.shape)}")
    ranges = t.long()
    ids = torch.arange(n_ids, device=device)
    return (ids >= ranges[..., :1]) & (ids < ranges[..., 1:])  # (..., n_ids)


def restrict(logits: torch.Tensor, allowed) -> torch.Tensor:
    """Logits (..., V) with every id that ``allowed`` does not permit at -inf (see the module doc);
    ValueError if it leaves some row no id at all."""
    if allowed is None:
        return logits
    mask = allowed_mask(allowed, logits.shape[-1], logits.device)
    if not bool(mask.any(-1).all()):
        raise ValueError("allowed leaves some row without any id to choose")
    return logits.masked_fill(~mask, float("-inf"))


def _top_k(logits: torch.Tensor, k: int) -> torch.Tensor:
    """(N, V): ids below the k-th largest at -inf (ids tied with the k-th are kept)."""
    kth = torch.topk(logits, k, dim=-1).values[:, -1:]
    return logits.masked_fill(logits < kth, float("-inf"))


def _top_p(logits: torch.Tensor, p: float) -> torch.Tensor:
    """(N, V): only the smallest set of likeliest ids whose probability reaches p kept."""
    sorted_logits, order = torch.sort(logits, descending=True, dim=-1)
    probs = sorted_logits.softmax(dim=-1)
    drop = probs.cumsum(dim=-1) - probs >= p  # the mass before this id already reaches p
    sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
    return torch.full_like(logits, float("-inf")).scatter(-1, order, sorted_logits)


def sample(logits: torch.Tensor, temperature: float, *, top_k: int = 0, top_p: float = 1.0, allowed=None,
           generator: torch.Generator | None = None) -> torch.Tensor:
    """Token ids (...) from logits (..., V): greedy at temperature 0, else filtered sampling (module doc)."""
    check_sampling(temperature, top_k, top_p)
    logits = restrict(logits, allowed)
    if temperature == 0:
        return logits.argmax(dim=-1)
    p = probs(logits, temperature, top_k=top_k, top_p=top_p)
    return torch.multinomial(p.reshape(-1, p.shape[-1]), 1, generator=generator).reshape(p.shape[:-1])


def probs(logits: torch.Tensor, temperature: float, *, top_k: int = 0, top_p: float = 1.0) -> torch.Tensor:
    """The distribution (..., V) fp32 that `sample` draws from at temperature > 0 (steps 3 of the
    module doc; speculative sampling compares the target's and the draft's)."""
    lead, V = logits.shape[:-1], logits.shape[-1]
    flat = logits.float().reshape(-1, V) / temperature  # (N, V)
    if top_k and top_k < V:
        flat = _top_k(flat, top_k)
    if top_p < 1.0:
        flat = _top_p(flat, top_p)
    return flat.softmax(dim=-1).reshape(*lead, V)
