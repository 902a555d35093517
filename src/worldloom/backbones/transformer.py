"""Llama-family parts: RMSNorm, rotary positions, SwiGLU, grouped-query attention, the cache.

The layer stack that puts them together (and that the ``transformer`` backbone is) lives in
``stack.py``.

Attention runs through `torch.nn.functional.scaled_dot_product_attention`, which picks a
flash / memory-efficient kernel where the device has one. The layout of the weights
(half-split rotary, q/k/v heads in order) is the one of `transformers.LlamaForCausalLM`,
so `worldloom export hf` is a renaming of tensors, not a conversion.
"""

from __future__ import annotations

import dataclasses
import math

import torch
import torch.nn.functional as F
from torch import nn

from .mixer import MixerContext, register_mixer


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-5):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        return F.rms_norm(x, (x.shape[-1],), self.weight, self.eps)


def rope_table(head_dim: int, length: int, theta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin of shape (length, head_dim) in the half-split layout."""
    inv = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim))
    freqs = torch.outer(torch.arange(length, dtype=torch.float32), inv)  # (T, D/2)
    emb = torch.cat((freqs, freqs), dim=-1)  # (T, D)
    return emb.cos(), emb.sin()


def apply_rope(x, cos, sin):
    """x: (B, H, T, D); cos/sin broadcastable to it."""
    x1, x2 = x.chunk(2, dim=-1)
    return x * cos + torch.cat((-x2, x1), dim=-1) * sin


def _select_rows(state, rows: torch.Tensor):
    """Rows of a recurrent layer's state: every tensor field is indexed on its batch axis (0)."""
    if state is None:
        return None
    fields = {f.name: getattr(state, f.name) for f in dataclasses.fields(state)}
    return type(state)(**{k: v.index_select(0, rows) if isinstance(v, torch.Tensor) else v for k, v in fields.items()})


class KVCache:
    """The decoding state of a layer stack: pre-allocated keys and values for attention
    layers, a recurrent state (``states[i]``: MambaState, Mamba2State, RetentionState, LinearAttentionState) for the others,
    plus left-padding of each row.

    ``pad[b]`` tokens at the left of row b are padding: they are masked as keys, the first
    real token of every row sits at rotary position 0, and recurrent layers leave their
    state untouched at pad positions.
    """

    def __init__(self, n_layer: int, batch: int, max_len: int, pad: torch.Tensor | None = None):
        self.k: list[torch.Tensor | None] = [None] * n_layer
        self.v: list[torch.Tensor | None] = [None] * n_layer
        self.batch = batch
        self.max_len = max_len
        self.length = 0  # slots filled
        self.pad = pad if pad is not None and bool(pad.any()) else None
        self.pad_max = int(self.pad.max()) if self.pad is not None else 0  # slots before this may hold padding
        self.states: list = [None] * n_layer  # recurrent layers' states (None until their first token)

    def select(self, rows: torch.Tensor, max_len: int | None = None) -> "KVCache":
        """A new cache holding rows `rows` (B',) of this one (repeats allowed), e.g. to branch
        several continuations from one prefix without prefilling again. Only the filled slots are
        copied; `max_len` (>= length) sizes the new cache (default: this one's)."""
        max_len = self.max_len if max_len is None else max_len
        if max_len < self.length:
            raise ValueError(f"max_len {max_len} is shorter than the {self.length} filled slots")
        out = KVCache(len(self.k), len(rows), max_len)

        def take(t):
            if t is None:
                return None
            new = t.new_zeros(len(rows), t.shape[1], max_len, t.shape[3])
            new[:, :, : self.length] = t[:, :, : self.length].index_select(0, rows)
            return new

        out.k = [take(t) for t in self.k]
        out.v = [take(t) for t in self.v]
        out.length = self.length
        out.pad = None if self.pad is None else self.pad.index_select(0, rows)
        out.pad_max = self.pad_max
        out.states = [_select_rows(st, rows) for st in self.states]
        return out

    def update(self, i: int, k: torch.Tensor, v: torch.Tensor):
        """Write k, v (B, KV, T, D) after the filled slots; return all keys/values so far."""
        if self.k[i] is None:
            B, H, _, D = k.shape
            self.k[i] = k.new_zeros(B, H, self.max_len, D)
            self.v[i] = v.new_zeros(B, H, self.max_len, D)
        s, t = self.length, k.shape[2]
        self.k[i][:, :, s : s + t] = k
        self.v[i][:, :, s : s + t] = v
        return self.k[i][:, :, : s + t], self.v[i][:, :, : s + t]


@register_mixer("attn", backbone="transformer", bidirectional=True)
class Attention(nn.Module):
    """Grouped-query causal attention with rotary positions; the mixer ``attn``."""

    recurrent = False  # keys and values go to the cache; rotary tables and the mask come with the context

    def __init__(self, cfg):
        super().__init__()
        self.n_head, self.n_kv, self.hd = cfg.n_head, cfg.kv_heads, cfg.head_dim
        self.qkv = nn.Linear(cfg.d_model, (self.n_head + 2 * self.n_kv) * self.hd, bias=False)
        self.proj = nn.Linear(self.n_head * self.hd, cfg.d_model, bias=False)
        self.dropout = cfg.dropout

    def fused_slices(self) -> dict[str, tuple[int, ...]]:
        """The projections fused in one layer (LoRA adapts each slice on its own): qkv -> q, k, v."""
        return {"qkv": (self.n_head * self.hd, self.n_kv * self.hd, self.n_kv * self.hd)}

    def _qkv(self, x, cos, sin):
        """Queries (B, H, T, D), rotated keys and values (B, KV, T, D)."""
        B, T, _ = x.shape
        H, KV = self.n_head, self.n_kv
        qkv = self.qkv(x).view(B, T, H + 2 * KV, self.hd).transpose(1, 2)  # (B, H+2KV, T, D)
        qk = apply_rope(qkv[:, : H + KV], cos, sin)  # rotate queries and keys in one pass
        return qk[:, :H], qk[:, H:], qkv[:, H + KV :]

    def _attend(self, q, k, v, mask, causal: bool):
        """Attention of q (B, H, T, D) over k, v (B, KV, S, D), projected back to (B, T, C)."""
        B, _, T, _ = q.shape
        if self.n_kv != self.n_head:
            rep = self.n_head // self.n_kv
            k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
        y = F.scaled_dot_product_attention(
            q, k, v, attn_mask=mask, is_causal=causal, dropout_p=self.dropout if self.training else 0.0
        )  # (B, H, T, D)
        return self.proj(y.transpose(1, 2).reshape(B, T, self.n_head * self.hd))

    def mix(self, x, ctx: MixerContext, layer: int):
        """The stack's call (see mixer.py): a forward pass, or the fixed-shape decoding step at ``ctx.slot``."""
        if ctx.slot is not None:
            return self.step(x, ctx.cos, ctx.sin, ctx.cache, layer, ctx.slot, ctx.mask)
        if ctx.ring is not None:  # this rank's block of each sequence, keys/values passed around the ring
            from .ring import ring_attention

            B, T, _ = x.shape
            q, k, v = self._qkv(x, ctx.cos, ctx.sin)
            y = ring_attention(q, k, v, ctx.ring)  # (B, H, T, D)
            return self.proj(y.transpose(1, 2).reshape(B, T, self.n_head * self.hd))
        return self(x, ctx.cos, ctx.sin, ctx.cache, layer, ctx.mask, ctx.causal)

    def forward(self, x, cos, sin, cache: KVCache | None, layer: int, mask, causal: bool):
        q, k, v = self._qkv(x, cos, sin)
        if cache is not None:
            k, v = cache.update(layer, k, v)  # (B, KV, S, D)
        return self._attend(q, k, v, mask, causal)

    def step(self, x, cos, sin, cache: KVCache, layer: int, slot: torch.Tensor, mask):
        """One new token per row, written at cache slot `slot` (a 0-d tensor); attends over the
        whole pre-allocated cache under `mask`. Every shape is fixed, so torch.compile traces
        one graph for the whole generation."""
        q, k, v = self._qkv(x, cos, sin)  # T = 1
        kb, vb = cache.k[layer], cache.v[layer]  # (B, KV, S, D)
        kb.index_copy_(2, slot.view(1), k)
        vb.index_copy_(2, slot.view(1), v)
        return self._attend(q, kb, vb, mask, False)


class SwiGLU(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.ff = cfg.ff_dim
        self.gate_up = nn.Linear(cfg.d_model, 2 * self.ff, bias=False)
        self.down = nn.Linear(self.ff, cfg.d_model, bias=False)

    def fused_slices(self) -> dict[str, tuple[int, ...]]:
        return {"gate_up": (self.ff, self.ff)}

    def forward(self, x):
        g, u = self.gate_up(x).split(self.ff, dim=-1)
        return self.down(F.silu(g) * u)


def slot_mask(start: int, T: int, device) -> torch.Tensor:
    """(T, start+T) bool: query at slot start+i sees keys at slots <= start+i."""
    q = torch.arange(start, start + T, device=device)[:, None]
    k = torch.arange(start + T, device=device)[None]
    return k <= q


def init_weights(module: nn.Module, n_layer: int) -> None:
    """GPT-2 initialisation: N(0, 0.02), residual projections scaled by 1/sqrt(2 * n_layer).

    Modules with their own init (Mamba's Δ, A and D) get it back afterwards through their
    ``reset_ssm_parameters()``; Conv1d and GroupNorm keep PyTorch's default init.
    """
    for m in module.modules():
        if isinstance(m, nn.Linear):
            nn.init.normal_(m.weight, std=0.02)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Embedding):
            nn.init.normal_(m.weight, std=0.02)
    for m in module.modules():
        for p in getattr(m, "residual_projections", lambda: [])():
            nn.init.normal_(p, std=0.02 / math.sqrt(2 * n_layer))
    for m in module.modules():
        if hasattr(m, "reset_ssm_parameters"):
            m.reset_ssm_parameters()
