"""One pre-norm layer stack for every backbone: attention, Mamba, Mamba-2, retention and linear-attention layers, mixed freely.

Each layer is ``x + mixer(norm(x))`` then, unless ``model.ffn=none``, ``x + ffn(norm(x))``
with a SwiGLU MLP or a mixture of experts. The mixer of layer i is ``cfg.layer_kinds[i]``, a
name in the mixer registry (mixer.py):

    attn     grouped-query attention with rotary positions (transformer.py)
    mamba    selective state-space layer (mamba.py)
    mamba2   Mamba-2: selective state space in its matmul (SSD) form (mamba2.py)
    retnet   multi-scale retention (retnet.py)
    linear   linear attention, elu(x) + 1 feature map (linear_attention.py)

Backbones: one per mixer that names one at its registration (``transformer`` = all attn,
``mamba``, ``mamba2``, ``retnet``, ``linear``), and ``hybrid`` (``model.layers`` names each
layer). Parameter names are
``blocks.{i}.{kind}_norm``, ``blocks.{i}.{kind}``, ``blocks.{i}.mlp_norm``, ``blocks.{i}.mlp``,
so an all-attention stack has exactly the names (and the Llama layout) of the transformer
checkpoints that came before the stack.

Every mixer is called as ``mixer.mix(h, ctx, i)`` with one ``MixerContext`` per call, built
here: rotary tables and the attention mask if some layer is not recurrent, the ``valid`` mask
if some layer is. ``forward(x, cache, causal=False)`` is a bidirectional pass (the masked
objectives; a (B,) bool ``causal`` chooses per row): the mask then opens later positions too,
for stacks whose every mixer is registered ``bidirectional`` (attention).

One cache (``KVCache``) serves every stack: keys/values for attention layers, a recurrent state
for the others, one ``length`` and one left padding for all. Under left padding the recurrent
layers get a ``valid`` mask for the slots that may hold pads, so their state after a row's pad
prefix is exactly the empty state.
"""

from __future__ import annotations

import torch
from torch import nn

from . import register
from .mixer import MIXERS, MixerContext, build_mixer
from .moe import MoEFeedForward
from .transformer import KVCache, RMSNorm, SwiGLU, rope_table, slot_mask


def _compute_dtype(x: torch.Tensor) -> torch.dtype:
    """The dtype matmuls run in: autocast's where it is on, else the input's."""
    return torch.get_autocast_dtype(x.device.type) if torch.is_autocast_enabled(x.device.type) else x.dtype


def _ffn(cfg) -> nn.Module | None:
    if cfg.ffn == "swiglu":
        return SwiGLU(cfg)
    if cfg.ffn == "moe":
        m = cfg.moe
        return MoEFeedForward(cfg.d_model, cfg.ff_dim, m.experts, m.top_k, m.capacity, m.balance_coef, m.z_coef)
    return None


class Block(nn.Module):
    def __init__(self, cfg, kind: str):
        super().__init__()
        self.kind = kind
        self.add_module(f"{kind}_norm", RMSNorm(cfg.d_model, cfg.norm_eps))
        self.add_module(kind, build_mixer(kind, cfg))
        ffn = _ffn(cfg)
        if ffn is not None:
            self.mlp_norm = RMSNorm(cfg.d_model, cfg.norm_eps)
            self.mlp = ffn
        else:
            self.mlp = None
        self.drop = nn.Dropout(cfg.dropout)

    @property
    def mixer(self) -> nn.Module:
        return self._modules[self.kind]

    @property
    def mixer_norm(self) -> nn.Module:
        return self._modules[f"{self.kind}_norm"]

    def out_projection(self) -> torch.Tensor:
        """The weight writing the mixer's output into the residual stream."""
        m = self.mixer
        return m.out_proj.weight if hasattr(m, "out_proj") else m.proj.weight  # SSMs: out_proj; attention, retention: proj

    def forward(self, x, ctx: MixerContext, i: int):
        x = x + self.drop(self.mixer.mix(self.mixer_norm(x), ctx, i))
        if self.mlp is None:
            return x
        return x + self.drop(self.mlp(self.mlp_norm(x)))


class Stack(nn.Module):
    """Pre-norm blocks with one mixer kind per layer. The final norm and the head belong to the model."""

    def __init__(self, cfg, kinds: list[str]):
        super().__init__()
        if len(kinds) != cfg.n_layer:
            raise ValueError(f"{len(kinds)} layer kinds for {cfg.n_layer} layers")
        self.cfg = cfg
        self.kinds = list(kinds)
        self.blocks = nn.ModuleList(Block(cfg, k) for k in kinds)
        recurrent = [b.mixer.recurrent for b in self.blocks]
        self.has_attn = not all(recurrent)  # some layer reads rotary tables and the attention mask
        self.has_recurrent = any(recurrent)  # some layer keeps a state and reads the valid mask
        self.bidirectional = all(MIXERS[k].bidirectional for k in kinds)  # every layer can attend both ways
        if self.has_attn:
            cos, sin = rope_table(cfg.head_dim, cfg.context, cfg.rope_theta)
            self.register_buffer("cos", cos, persistent=False)
            self.register_buffer("sin", sin, persistent=False)

    @property
    def supports_decode_step(self) -> bool:
        """Whether decode_step (the fixed-shape, compilable one-token step) exists for this stack."""
        return not self.has_recurrent and self.cfg.ffn != "moe"

    def residual_projections(self):
        """Output projections of each residual branch (scaled down at init, GPT-2 style).

        MoE experts' projections are listed by MoEFeedForward itself.
        """
        for b in self.blocks:
            yield b.out_projection()
            if isinstance(b.mlp, SwiGLU):
                yield b.mlp.down.weight

    def new_cache(self, batch: int, max_len: int, pad: torch.Tensor | None = None) -> KVCache:
        if max_len > self.cfg.context:
            raise ValueError(f"cache of {max_len} positions exceeds the model context {self.cfg.context}")
        return KVCache(self.cfg.n_layer, batch, max_len, pad)

    def forward(self, x, cache: KVCache | None = None, causal: bool | torch.Tensor = True, tree=None):
        """x (B, T, C) -> (h, cache). ``causal`` False: a bidirectional pass (every position sees every
        real token; attention-only stacks, no cache filled before); a (B,) bool tensor: per row.
        ``tree = (see, pos)``: the new tokens form a tree of candidates (Medusa): see (T, T) bool, which
        new tokens each one attends to (itself included; every cached slot is seen), pos (T,) each one's
        rotary position counted from slot ``start`` (a node's depth); attention-only stacks."""
        B, T, _ = x.shape  # (B, T, C)
        start = cache.length if cache is not None else 0
        if start + T > self.cfg.context:
            raise ValueError(f"sequence of {start + T} positions exceeds the model context {self.cfg.context}")
        if causal is not True and not self.bidirectional:
            raise ValueError(f"a bidirectional pass needs layers that can attend both ways; this stack has {','.join(self.kinds)}")
        if tree is not None and self.has_recurrent:
            raise ValueError(f"a tree of candidates needs attention-only layers (a recurrent state reads one sequence); "
                             f"this stack has {','.join(self.kinds)}: verify a chain instead")
        pad = cache.pad if cache is not None else None
        ctx = MixerContext(cache, ring=self._ring_group() if cache is None else None)
        if ctx.ring is not None:  # this rank holds tokens rank*T .. rank*T+T-1 of each sequence
            from .ring import local_positions

            pos, dt = local_positions(T, ctx.ring, device=x.device), _compute_dtype(x)
            ctx.cos, ctx.sin = self.cos[pos].to(dt), self.sin[pos].to(dt)
        elif self.has_attn:
            ctx.cos, ctx.sin, ctx.mask, ctx.causal = self._attention_inputs(x, start, T, pad, causal, tree)
        if self.has_recurrent and pad is not None and start < cache.pad_max:
            ctx.valid = torch.arange(start, start + T, device=x.device)[None] >= pad[:, None]  # (B, T)
        for i, block in enumerate(self.blocks):
            x = block(x, ctx, i)
        if cache is not None:
            cache.length += T
        return x, cache

    def _ring_group(self):
        """The process group of sequence-parallel training (model.attention=ring under torchrun,
        training mode), else None: evaluation and decoding see whole sequences on each rank."""
        if self.cfg.attention != "ring" or not self.training:
            return None
        import torch.distributed as dist

        if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() < 2:
            return None
        return dist.group.WORLD

    def _attention_inputs(self, x, start: int, T: int, pad, causal: bool | torch.Tensor = True, tree=None):
        """Rotary tables and the attention mask for slots start .. start+T-1 (see forward for ``causal``, ``tree``)."""
        mask, plain = None, False
        if tree is not None:
            cos, sin, mask = self._tree_inputs(start, T, pad, tree, x.device)
        elif pad is None:
            cos, sin = self.cos[start : start + T], self.sin[start : start + T]  # (T, D)
            if causal is not True:
                mask = _open_mask(start, T, None, causal, x.device)
            elif T > 1:
                if start == 0:
                    plain = True
                else:  # several new tokens after a filled cache: mask by absolute slot
                    mask = slot_mask(start, T, x.device)[None, None]
        else:
            slots = torch.arange(start, start + T, device=x.device)
            pos = (slots[None] - pad[:, None]).clamp(min=0)  # (B, T)
            cos, sin = self.cos[pos][:, None], self.sin[pos][:, None]  # (B, 1, T, D)
            if causal is not True:
                mask = _open_mask(start, T, pad, causal, x.device)
            else:
                keys = torch.arange(start + T, device=x.device)
                mask = slot_mask(start, T, x.device)[None] & (
                    (keys[None, None] >= pad[:, None, None]) | (slots[None, :, None] == keys[None, None])
                )  # (B, T, S): causal, real keys only (a pad query sees itself so no row is empty)
                mask = mask[:, None]  # (B, 1, T, S)
        dt = _compute_dtype(x)
        if cos.dtype != dt:  # rotate in the compute dtype so no op silently runs in fp32
            cos, sin = cos.to(dt), sin.to(dt)
        return cos, sin, mask, plain

    def _tree_inputs(self, start: int, T: int, pad, tree, device):
        """Rotary tables and mask of new tokens that form a tree (forward's ``tree = (see, pos)``)."""
        see, rel = tree
        if tuple(see.shape) != (T, T) or tuple(rel.shape) != (T,):
            raise ValueError(f"a tree over {T} new tokens needs see ({T}, {T}) and pos ({T},), "
                             f"got {tuple(see.shape)} and {tuple(rel.shape)}")
        pos = start + rel.to(device)  # (T,)
        mask = torch.cat([torch.ones(T, start, dtype=torch.bool, device=device), see.to(device)], 1)[None]  # (1, T, S)
        if pad is None:
            return self.cos[pos], self.sin[pos], mask[:, None]
        keys = torch.arange(start + T, device=device)
        slots = torch.arange(start, start + T, device=device)
        mask = mask & ((keys[None, None] >= pad[:, None, None]) | (slots[None, :, None] == keys[None, None]))  # (B, T, S)
        pos = (pos[None] - pad[:, None]).clamp(min=0)  # (B, T)
        return self.cos[pos][:, None], self.sin[pos][:, None], mask[:, None]

    def decode_step(self, x, cache: KVCache, slot: torch.Tensor):
        """x (B, 1, C) at cache slot `slot` (0-d long tensor, = cache.length) -> h (B, 1, C).

        The fixed-shape twin of forward() for one token after a prefill; the caller advances
        cache.length. Used by generate_ids(compile=True); attention-only stacks without MoE.
        """
        if not self.supports_decode_step:
            raise ValueError("decode_step (compiled decoding) needs an attention-only stack without MoE; "
                             f"this one has layers {','.join(self.kinds)} and ffn {self.cfg.ffn}")
        B = x.shape[0]
        keys = torch.arange(cache.max_len, device=x.device)
        if cache.pad is None:
            pos = slot.view(1)  # (1,)
            mask = (keys <= slot).view(1, 1, 1, -1)
        else:
            pos = slot - cache.pad  # (B,)
            mask = ((keys[None] <= slot) & (keys[None] >= cache.pad[:, None])).view(B, 1, 1, -1)
        dt = _compute_dtype(x)
        cos = self.cos[pos].to(dt).view(-1, 1, 1, self.cfg.head_dim)  # (B or 1, 1, 1, D)
        sin = self.sin[pos].to(dt).view(-1, 1, 1, self.cfg.head_dim)
        ctx = MixerContext(cache, cos, sin, mask, slot=slot)
        for i, block in enumerate(self.blocks):
            x = block(x, ctx, i)
        return x


def _open_mask(start: int, T: int, pad, causal: bool | torch.Tensor, device) -> torch.Tensor | None:
    """The mask of a pass that is not all causal: ``causal`` False (every query sees every key) or a
    (B,) bool tensor (True rows causal, False rows bidirectional); left-padded keys stay masked.
    None (no mask at all) for a bidirectional pass without padding."""
    if start:
        raise ValueError("a bidirectional pass reads the whole sequence at once; it cannot follow a filled cache")
    if causal is False and pad is None:
        return None
    see = torch.ones(1, T, T, dtype=torch.bool, device=device)  # (1, T, S)
    if isinstance(causal, torch.Tensor):
        see = slot_mask(0, T, device)[None] | ~causal.to(device=device, dtype=torch.bool)[:, None, None]  # (B, T, S)
    if pad is not None:
        keys = torch.arange(T, device=device)
        see = see & ((keys[None, None] >= pad[:, None, None]) | torch.eye(T, dtype=torch.bool, device=device)[None])
    return see[:, None]  # (B or 1, 1, T, S)


@register("hybrid")
def build_hybrid(cfg) -> Stack:
    return Stack(cfg, cfg.layer_kinds)
