"""Rows of a decoding cache joined and compacted: what continuous batching needs of `KVCache`.

A running batch holds one `KVCache` (keys/values of attention layers, a state per recurrent layer,
one ``length`` and left padding per row). New requests are prefilled in a cache of their own and
joined to the batch between steps; finished rows leave through ``KVCache.select``. Both caches
are right-aligned on a common length: the shorter one's rows get more left padding, so every
row keeps its rotary positions (slot - pad) and sees only its own keys.

Recurrent states are joined along their batch axis. Retention (RetNet) numbers positions from
the tokens its state has seen (``RetentionState.n``, one for the whole batch); only differences
of positions matter, so the joining rows' state is rotated onto the batch's count (`_rotate`):
its keys, stored in S, turn by the difference as if they had been seen that much later.

``compact`` drops the leading slots that are padding in every row, so a batch that keeps
admitting rows never outgrows the model context while each row fits in it.
"""

from __future__ import annotations

import dataclasses

import torch

from ..backbones.retnet import RetentionState, rope_at
from ..backbones.transformer import KVCache, apply_rope


def _pads(cache: KVCache, shift: int) -> torch.Tensor:
    """(B,) left padding of each row once the cache is shifted right by ``shift`` slots."""
    pad = cache.pad if cache.pad is not None else torch.zeros(cache.batch, dtype=torch.long)
    return pad.cpu() + shift


def _place(a: torch.Tensor | None, b: torch.Tensor | None, la: int, lb: int, length: int, max_len: int):
    """Keys or values (B, KV, S, D) of two caches stacked on rows, each right-aligned to ``length``."""
    if a is None and b is None:
        return None
    ref = a if a is not None else b
    out = ref.new_zeros(_rows(a) + _rows(b), ref.shape[1], max_len, ref.shape[3])
    if a is not None:
        out[: a.shape[0], :, length - la : length] = a[:, :, :la]
    if b is not None:
        out[_rows(a):, :, length - lb : length] = b[:, :, :lb]
    return out


def _rows(t) -> int:
    return 0 if t is None else t.shape[0]


def _rotate(state: RetentionState, n: int, theta: float) -> RetentionState:
    """A retention state moved to ``n`` tokens seen: S's key axis rotated by n - state.n positions."""
    S = state.S  # (B, H, dk, dv)
    cos, sin = rope_at(S.shape[2], n - state.n, 1, theta, S.device)  # (1, dk)
    turned = apply_rope(S.transpose(-1, -2).float(), cos, sin).transpose(-1, -2)  # rotate each key column
    return RetentionState(turned.to(S.dtype), n)


def _join_states(a, b, theta: float | None):
    """Two recurrent layer states (same type) stacked on their batch axis."""
    if a is None or b is None:
        if a is not None or b is not None:
            raise ValueError("cannot join a cache whose recurrent state is empty with one that has it")
        return None
    if isinstance(a, RetentionState) and a.n != b.n:
        b = _rotate(b, a.n, theta if theta is not None else 10000.0)
    fields = {}
    for f in dataclasses.fields(a):
        x, y = getattr(a, f.name), getattr(b, f.name)
        if isinstance(x, torch.Tensor):
            fields[f.name] = torch.cat([x, y.to(x.dtype)], dim=0)
        elif x != y:
            raise ValueError(f"cannot join {type(a).__name__} states whose {f.name} differ ({x} vs {y})")
        else:
            fields[f.name] = x
    return type(a)(**fields)


def join(a: KVCache, b: KVCache, thetas: list | None = None) -> KVCache:
    """One cache holding a's rows then b's rows, right-aligned on the longer length.

    ``thetas[i]``: the rotary base of layer i where it is a retention layer (see the module doc).
    Both caches must have the same layers; the result has a's ``max_len``."""
    if a.batch == 0:
        return b.select(torch.arange(b.batch), a.max_len)
    length = max(a.length, b.length)
    if length > a.max_len:
        raise ValueError(f"joined rows need {length} slots, more than the cache's {a.max_len}")
    out = KVCache(len(a.k), a.batch + b.batch, a.max_len)
    out.k = [_place(x, y, a.length, b.length, length, a.max_len) for x, y in zip(a.k, b.k)]
    out.v = [_place(x, y, a.length, b.length, length, a.max_len) for x, y in zip(a.v, b.v)]
    thetas = thetas or [None] * len(a.k)
    out.states = [_join_states(x, y, t) for x, y, t in zip(a.states, b.states, thetas)]
    out.length = length
    _set_pad(out, torch.cat([_pads(a, length - a.length), _pads(b, length - b.length)]))
    return out


def _set_pad(cache: KVCache, pad: torch.Tensor) -> None:
    device = next((t.device for t in cache.k if t is not None), pad.device)
    cache.pad = pad.to(device) if bool(pad.any()) else None
    cache.pad_max = int(pad.max()) if len(pad) else 0


def compact(cache: KVCache) -> KVCache:
    """The cache without the leading slots that every row has as padding (the same cache if none)."""
    if cache.pad is None or cache.batch == 0:
        return cache
    drop = int(cache.pad.min())
    if drop == 0:
        return cache
    out = KVCache(len(cache.k), cache.batch, cache.max_len)
    keep = cache.length - drop

    def shift(t):
        if t is None:
            return None
        new = torch.zeros_like(t)
        new[:, :, :keep] = t[:, :, drop : cache.length]
        return new

    out.k, out.v = [shift(t) for t in cache.k], [shift(t) for t in cache.v]
    out.states = list(cache.states)
    out.length = keep
    _set_pad(out, cache.pad.cpu() - drop)
    return out


def retention_thetas(model) -> list:
    """Per layer of the model's stack: the rotary base of a retention layer, None for other layers."""
    blocks = getattr(model.backbone, "blocks", [])
    return [getattr(b.mixer, "theta", None) if b.kind == "retnet" else None for b in blocks]
