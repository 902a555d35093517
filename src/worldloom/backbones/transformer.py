"""A Llama-family decoder: RMSNorm, rotary positions, SwiGLU, grouped-query attention.

Attention runs through `torch.nn.functional.scaled_dot_product_attention`, which picks a
flash / memory-efficient kernel where the device has one. The layout of the weights
(half-split rotary, q/k/v heads in order) is the one of `transformers.LlamaForCausalLM`,
so `worldloom export hf` is a renaming of tensors, not a conversion.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from . import register


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


class KVCache:
    """Pre-allocated keys and values per layer, plus left-padding of each row.

    ``pad[b]`` tokens at the left of row b are padding: they are masked as keys, and the
    first real token of every row sits at rotary position 0.
    """

    def __init__(self, n_layer: int, batch: int, max_len: int, pad: torch.Tensor | None = None):
        self.k: list[torch.Tensor | None] = [None] * n_layer
        self.v: list[torch.Tensor | None] = [None] * n_layer
        self.batch = batch
        self.max_len = max_len
        self.length = 0  # slots filled
        self.pad = pad if pad is not None and bool(pad.any()) else None

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


class Attention(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.n_head, self.n_kv, self.hd = cfg.n_head, cfg.kv_heads, cfg.head_dim
        self.qkv = nn.Linear(cfg.d_model, (self.n_head + 2 * self.n_kv) * self.hd, bias=False)
        self.proj = nn.Linear(self.n_head * self.hd, cfg.d_model, bias=False)
        self.dropout = cfg.dropout

    def forward(self, x, cos, sin, cache: KVCache | None, layer: int, mask, causal: bool):
        B, T, _ = x.shape
        H, KV = self.n_head, self.n_kv
        qkv = self.qkv(x).view(B, T, H + 2 * KV, self.hd).transpose(1, 2)  # (B, H+2KV, T, D)
        qk = apply_rope(qkv[:, : H + KV], cos, sin)  # rotate queries and keys in one pass
        q, k, v = qk[:, :H], qk[:, H:], qkv[:, H + KV :]  # (B, H, T, D), (B, KV, T, D) x2
        if cache is not None:
            k, v = cache.update(layer, k, v)  # (B, KV, S, D)
        if self.n_kv != self.n_head:
            rep = self.n_head // self.n_kv
            k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
        y = F.scaled_dot_product_attention(
            q, k, v, attn_mask=mask, is_causal=causal, dropout_p=self.dropout if self.training else 0.0
        )  # (B, H, T, D)
        return self.proj(y.transpose(1, 2).reshape(B, T, self.n_head * self.hd))


class SwiGLU(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.ff = cfg.ff_dim
        self.gate_up = nn.Linear(cfg.d_model, 2 * self.ff, bias=False)
        self.down = nn.Linear(self.ff, cfg.d_model, bias=False)

    def forward(self, x):
        g, u = self.gate_up(x).split(self.ff, dim=-1)
        return self.down(F.silu(g) * u)


class Block(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.attn_norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.attn = Attention(cfg)
        self.mlp_norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.mlp = SwiGLU(cfg)
        self.drop = nn.Dropout(cfg.dropout)

    def forward(self, x, cos, sin, cache, layer, mask, causal):
        x = x + self.drop(self.attn(self.attn_norm(x), cos, sin, cache, layer, mask, causal))
        return x + self.drop(self.mlp(self.mlp_norm(x)))


class Transformer(nn.Module):
    """Stack of pre-norm blocks. The final norm and the head belong to the model."""

    def __init__(self, cfg):
        super().__init__()
        self.cfg = cfg
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layer))
        cos, sin = rope_table(cfg.head_dim, cfg.context, cfg.rope_theta)
        self.register_buffer("cos", cos, persistent=False)
        self.register_buffer("sin", sin, persistent=False)

    def residual_projections(self):
        """Output projections of each residual branch (scaled down at init, GPT-2 style)."""
        for b in self.blocks:
            yield b.attn.proj.weight
            yield b.mlp.down.weight

    def new_cache(self, batch: int, max_len: int, pad: torch.Tensor | None = None) -> KVCache:
        if max_len > self.cfg.context:
            raise ValueError(f"cache of {max_len} positions exceeds the model context {self.cfg.context}")
        return KVCache(self.cfg.n_layer, batch, max_len, pad)

    def forward(self, x, cache: KVCache | None = None):
        B, T, _ = x.shape  # (B, T, C)
        start = cache.length if cache is not None else 0
        if start + T > self.cfg.context:
            raise ValueError(f"sequence of {start + T} positions exceeds the model context {self.cfg.context}")
        pad = cache.pad if cache is not None else None
        mask, causal = None, False
        if pad is None:
            cos, sin = self.cos[start : start + T], self.sin[start : start + T]  # (T, D)
            if T > 1:
                if start == 0:
                    causal = True
                else:  # several new tokens after a filled cache: mask by absolute slot
                    mask = _slot_mask(start, T, x.device)[None, None]
        else:
            slots = torch.arange(start, start + T, device=x.device)
            pos = (slots[None] - pad[:, None]).clamp(min=0)  # (B, T)
            cos, sin = self.cos[pos][:, None], self.sin[pos][:, None]  # (B, 1, T, D)
            mask = _slot_mask(start, T, x.device)[None] & (
                (torch.arange(start + T, device=x.device)[None, None] >= pad[:, None, None])
                | (slots[None, :, None] == torch.arange(start + T, device=x.device)[None, None])
            )  # (B, T, S): causal, real keys only (a pad query sees itself so no row is empty)
            mask = mask[:, None]  # (B, 1, T, S)
        dt = torch.get_autocast_dtype(x.device.type) if torch.is_autocast_enabled(x.device.type) else x.dtype
        if cos.dtype != dt:  # rotate in the compute dtype so no op silently runs in fp32
            cos, sin = cos.to(dt), sin.to(dt)
        for i, block in enumerate(self.blocks):
            x = block(x, cos, sin, cache, i, mask, causal)
        if cache is not None:
            cache.length += T
        return x, cache


def _slot_mask(start: int, T: int, device) -> torch.Tensor:
    """(T, start+T) bool: query at slot start+i sees keys at slots <= start+i."""
    q = torch.arange(start, start + T, device=device)[:, None]
    k = torch.arange(start + T, device=device)[None]
    return k <= q


@register("transformer")
def build_transformer(cfg) -> Transformer:
    return Transformer(cfg)


def init_weights(module: nn.Module, n_layer: int) -> None:
    """GPT-2 initialisation: N(0, 0.02), residual projections scaled by 1/sqrt(2 * n_layer)."""
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
