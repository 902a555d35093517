"""Observation encoder and decoder around the backbone (``stream.obs=encoded``).

The token stream lays every observation out as ``obs_len`` tokens (49 cells and a direction for a
MiniGrid view). With encoded observations the *ids* stay exactly that (the data, the packing, the
runner and the losses do not change), but the model reads each whole observation through a
**frame encoder** — the cells as a 2-D grid through 3x3 convolutions, as BabyAI's agents do —
and hands the backbone ``obs_vectors`` vectors in place of its ``obs_len`` positions. A step
``obs_t a_t r_t d_t`` costs the backbone ``obs_vectors + 3`` positions instead of ``obs_len + 3``.

The next observation is predicted by a **frame decoder**: from the backbone's state at the step's
last position (``d_t``, which has read the action) and the previous frame's tokens, a few
bidirectional attention layers over the ``obs_len`` cells give every cell's logits at once
(through the model's own output head). Inside the model's output these logits sit where the
token stream predicts the observation (position of ``d_t`` for cell 1, of cell j for cell j+1),
so every objective and metric over the stream reads them unchanged. Still one network: the
same backbone state predicts the action (policy) and, through the decoder, the next frame.

`FramePlan` finds, from the slots alone, where the frames of a batch of id rows are and how the
rows compress: positions outside observations keep one backbone position; a complete
observation (its first cell's slot is 1 and its last cell is in the row) becomes
``obs_vectors`` positions; an observation cut at the end of a row is dropped. Hidden states come
back at every id position: outside observations and at an observation's last cell (which
predicts the action) they are the backbone's; at the other cells they are the state before the
observation (causal: an encoded frame never tells its own cells).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from torch.nn import functional as F


class FrameEncoder(nn.Module):
    """Token embeddings of observations (N, obs_len, C) -> (N, vectors, C). The first grid**2 tokens are
    the cells of a square grid (row-major); the rest (e.g. the direction) join after the convolutions.
    With ``film``, every convolution's output is scaled and shifted per channel by a linear function of a
    conditioning vector (N, C) — the episode's mission (FiLM, as in BabyAI's agents: the mission decides
    which cells matter before the frame is squeezed into a few vectors)."""

    def __init__(self, d_model: int, obs_len: int, grid: int, vectors: int, channels: int = 64, film: bool = False):
        super().__init__()
        self.grid, self.vectors, self.rest = grid, vectors, obs_len - grid * grid
        self.inp = nn.Conv2d(d_model, channels, 3, padding=1)
        self.res = nn.ModuleList(nn.Conv2d(channels, channels, 3, padding=1) for _ in range(2))
        self.film = nn.Linear(d_model, 2 * channels * (1 + len(self.res))) if film else None
        self.out = nn.Linear(channels * grid * grid + d_model * self.rest, vectors * d_model)

    def forward(self, e: torch.Tensor, cond: torch.Tensor | None = None) -> torch.Tensor:
        N, _, C = e.shape
        g = self.grid
        mods = [None] * (1 + len(self.res))
        if self.film is not None:
            if cond is None:
                raise ValueError("this frame encoder is conditioned on the mission (FiLM): pass cond=")
            gb = self.film(cond.to(e.dtype)).view(N, len(mods), 2, self.inp.out_channels, 1, 1)  # (N, layers, scale/shift, ch, 1, 1)
            mods = [(gb[:, i, 0], gb[:, i, 1]) for i in range(len(mods))]

        def act(x, mod):
            return F.gelu(x if mod is None else x * (1 + mod[0]) + mod[1])

        x = act(self.inp(e[:, : g * g].transpose(1, 2).reshape(N, C, g, g)), mods[0])  # (N, ch, g, g)
        for conv, mod in zip(self.res, mods[1:]):
            x = x + act(conv(x), mod)
        feats = torch.cat([x.flatten(1), e[:, g * g :].flatten(1)], dim=1)
        return self.out(feats).view(N, self.vectors, C)


PAD, BOS, SEP = 0, 1, 2  # the stream's special ids (worldloom.world.stream): padding, <bos> and <sep> around a mission
N_SPECIAL = 3  # ids below this are special; mission words come after


def policy_slot(slots: int) -> int:
    """The slot of a step's last observation position, whose output predicts the action: a stream of ``slots`` slots
    numbers the mission prefix 0, the observation positions from 1, then action, reward and done (the last three)."""
    return slots - 4


def _episode_keys(idx: torch.Tensor, slots: torch.Tensor, at: torch.Tensor, bos: int) -> torch.Tensor:
    """(B * T,) a key per flat position of id rows ``idx``/``slots`` (B, T): the same for the positions of one
    episode (row, and episodes begun by a <bos> at slot 0 before it), increasing along the flattened rows.
    Raises where a step position of ``at`` has no <bos> before it in its row."""
    B, T = idx.shape
    seg = torch.cumsum((idx == bos) & (slots == 0), dim=1)  # episode number within the row (0 = before any <bos>)
    if len(at) and bool(((seg.reshape(-1)[at] == 0) & (slots.reshape(-1)[at] > 0)).any()):
        raise ValueError("a frame has no mission prefix before it in its row: pass the rows' mission prefixes as mission=")
    return (torch.arange(B, device=idx.device).unsqueeze(1) * (T + 1) + seg).reshape(-1)


def mission_vectors(emb: torch.Tensor, idx: torch.Tensor, slots: torch.Tensor, at: torch.Tensor, bos: int,
                    first_word: int) -> torch.Tensor:
    """The mean embedding of the mission words of the episode that flat positions ``at`` (N,) belong to, in
    id rows ``idx``/``slots`` (B, T) whose episodes each start with ``<bos> words <sep>`` (slot 0): (N, C).
    Words are the slot-0 ids >= ``first_word`` (not padding, <bos> or <sep>); an empty mission gives zeros.
    A step position (slot > 0) with no ``<bos>`` before it in its row raises (cached decoding passes the
    prefixes instead); other such positions (the left padding of a prefill) get zeros."""
    B, T = idx.shape
    C = emb.shape[-1]
    key = _episode_keys(idx, slots, at, bos)
    word = ((slots == 0) & (idx >= first_word)).reshape(-1)
    sums = emb.new_zeros(B * (T + 1), C).index_add(0, key[word], emb.reshape(-1, C)[word])
    counts = emb.new_zeros(B * (T + 1)).index_add(0, key[word], emb.new_ones(int(word.sum())))
    k = key[at]
    return sums[k] / counts[k].clamp(min=1).unsqueeze(1)


def mission_words(idx: torch.Tensor, slots: torch.Tensor, at: torch.Tensor, bos: int, first_word: int):
    """The mission words of the episodes that flat positions ``at`` (N,) belong to, in id rows ``idx``/``slots``
    (B, T) laid out as for ``mission_vectors``: (words (S, L) ids padded with 0, lengths (S,), which (N,) = the
    row of ``words`` of each position or -1 where its episode has no words). For encoders that read the words
    in order (a GRU) rather than their mean."""
    key = _episode_keys(idx, slots, at, bos)
    pos = torch.nonzero(((slots == 0) & (idx >= first_word)).reshape(-1)).squeeze(1)  # in order: keys never decrease
    if not len(pos):
        return idx.new_zeros(0, 1), idx.new_zeros(0), torch.full_like(at, -1)
    keys, inv, lengths = torch.unique_consecutive(key[pos], return_inverse=True, return_counts=True)
    rank = torch.arange(len(pos), device=idx.device) - (torch.cumsum(lengths, 0) - lengths)[inv]
    words = idx.new_zeros(len(keys), int(lengths.max()))
    words[inv, rank] = idx.reshape(-1)[pos]
    k = key[at]
    j = torch.searchsorted(keys, k).clamp(max=len(keys) - 1)
    return words, lengths, torch.where(keys[j] == k, j, -1)


class FrameDecoder(nn.Module):
    """(state (N, C), previous frame's token embeddings (N, obs_len, C)) -> (N, obs_len, C): one output per
    cell of the next frame, each cell attending to all cells of the previous frame and the state.

    The layers are ``nn.TransformerEncoderLayer`` s (pre-norm, GELU; their parameters are the checkpoint's),
    but the forward pass is written out here: attention over ~50 cells for hundreds of frames at once is a
    batch of tiny matrices, where PyTorch's CPU flash-attention kernel is slow (its bf16 backward ~6x
    slower than two plain matmuls and a softmax; measured in BENCHMARKS.md, "encoded observations")."""

    def __init__(self, d_model: int, obs_len: int, n_layer: int, n_head: int, d_ff: int):
        super().__init__()
        self.query = nn.Parameter(torch.randn(obs_len, d_model) * 0.02)
        self.cond = nn.Linear(d_model, d_model, bias=False)
        layer = nn.TransformerEncoderLayer(d_model, n_head, d_ff, dropout=0.0, activation="gelu", batch_first=True,
                                           norm_first=True)
        self.layers = nn.TransformerEncoder(layer, n_layer, enable_nested_tensor=False)
        self.n_head = n_head

    def forward(self, h: torch.Tensor, prev: torch.Tensor) -> torch.Tensor:
        x = prev + self.query + self.cond(h).unsqueeze(1)
        for layer in self.layers.layers:
            x = x + self._attend(layer.self_attn, layer.norm1(x))
            x = x + layer.linear2(F.gelu(layer.linear1(layer.norm2(x))))
        return x

    def _attend(self, attn: nn.MultiheadAttention, x: torch.Tensor) -> torch.Tensor:
        N, L, C = x.shape
        H = self.n_head
        q, k, v = F.linear(x, attn.in_proj_weight, attn.in_proj_bias).view(N, L, 3, H, C // H).permute(2, 0, 3, 1, 4)
        w = (q @ k.transpose(-1, -2)).float().mul_((C // H) ** -0.5).softmax(-1).to(v.dtype)  # (N, H, L, L)
        return attn.out_proj((w @ v).transpose(1, 2).reshape(N, L, C))


@dataclass
class FramePlan:
    """Where the observations of id rows are, and how the rows compress for the backbone (see module docs)."""

    length: int  # Tc: backbone positions of the longest compressed row
    keep_src: torch.Tensor  # (M,) flat id positions (b * T + t) kept as one backbone position each
    keep_dst: torch.Tensor  # (M,) their flat backbone positions (b * Tc + c)
    frame_src: torch.Tensor  # (N,) flat id positions of complete observations' first cells
    frame_dst: torch.Tensor  # (N,) flat backbone position of each one's first vector
    back: torch.Tensor  # (B, T) backbone position (within the row) whose state each id position gets
    decode_at: torch.Tensor  # (D,) flat id positions of step ends (d_t) whose step's observation is in the row
    decode_prev: torch.Tensor  # (D,) flat id positions of the first cell of that observation

    @classmethod
    def build(cls, slots: torch.Tensor, obs_len: int, step_len: int, vectors: int, idx: torch.Tensor | None = None,
              pad: int = 0) -> "FramePlan":
        """With ``idx``, the ``pad`` ids that end a row (right padding of a training batch) take no position."""
        B, T = slots.shape
        dev = slots.device
        pos = torch.arange(T, device=dev)
        is_obs = (slots >= 1) & (slots <= obs_len)
        last = (pos + obs_len - 1).clamp(max=T - 1)
        complete = (slots == 1) & (pos + obs_len - 1 < T) & (slots.gather(1, last.expand(B, T)) == obs_len)
        width = torch.where(complete, vectors, torch.where(is_obs, 0, 1))
        if idx is not None:  # right padding: after a row's last real id
            real = torch.where(idx != pad, pos, -1).amax(1, keepdim=True)
            width = torch.where(pos > real, 0, width)
        cum = width.cumsum(1)
        start = cum - width  # first backbone position of each id position's vectors
        inner = is_obs & (slots < obs_len) & (pos + obs_len - slots < T)  # a cell of a complete frame but its last
        back = torch.where(inner, cum - vectors - 1, cum - 1).clamp(min=0)
        length = max(int(cum[:, -1].max()), 1) if T else 1
        rows = torch.arange(B, device=dev).unsqueeze(1)
        flat_dst = rows * length + start
        flat_src = rows * T + pos
        keep = ~is_obs & (width == 1)
        ends = slots == step_len
        prev = pos - step_len + 1
        has_prev = ends & (prev >= 0) & (slots.gather(1, prev.clamp(min=0).expand(B, T)) == 1)
        return cls(length, flat_src[keep], flat_dst[keep], flat_src[complete], flat_dst[complete], back,
                   flat_src[has_prev], (flat_src - step_len + 1)[has_prev])

    def frames(self, idx: torch.Tensor, at: torch.Tensor, obs_len: int) -> torch.Tensor:
        """The obs_len ids starting at flat positions ``at`` (N,) of idx (B, T) -> (N, obs_len)."""
        return idx.reshape(-1)[at.unsqueeze(1) + torch.arange(obs_len, device=idx.device)]

    def compress(self, tokens: torch.Tensor, vectors: torch.Tensor, B: int) -> torch.Tensor:
        """Per-id embeddings (B, T, C) and frame vectors (N, K, C) -> backbone inputs (B, Tc, C) (zeros at the
        right end of shorter rows: later positions never reach earlier ones in a causal pass)."""
        C = tokens.shape[-1]
        out = tokens.new_zeros(B * self.length, C)
        out = out.index_copy(0, self.keep_dst, tokens.reshape(-1, C)[self.keep_src])
        if len(self.frame_dst):
            K = vectors.shape[1]
            dst = (self.frame_dst.unsqueeze(1) + torch.arange(K, device=out.device)).reshape(-1)
            out = out.index_copy(0, dst, vectors.reshape(-1, C).to(out.dtype))
        return out.view(B, self.length, C)

    def expand(self, h: torch.Tensor) -> torch.Tensor:
        """Backbone states (B, Tc, C) (or anything per backbone position) -> one per id position (B, T, C)."""
        return h.gather(1, self.back.unsqueeze(-1).expand(-1, -1, h.shape[-1]))


def step_positions(step_len: int, obs_len: int = 0, vectors: int = 0) -> int:
    """Model positions of one world step of ``step_len`` ids: the ids, or with ``vectors`` > 0 (encoded
    observations) the observation's ``obs_len`` ids replaced by that many vectors."""
    return vectors + step_len - obs_len if vectors else step_len


def backbone_positions(n_prefix: int, n_step_ids: int, obs_len: int, step_len: int, vectors: int) -> int:
    """Model positions of a row of ``n_prefix`` prefix ids and ``n_step_ids`` step ids that start at a step
    boundary: the ids themselves when ``vectors`` is 0 (the token stream); else an observation cut at
    the end counts as none of its cells."""
    if not vectors:
        return n_prefix + n_step_ids
    whole, part = divmod(n_step_ids, step_len)
    tail = 0 if part < obs_len else vectors + part - obs_len
    return n_prefix + whole * step_positions(step_len, obs_len, vectors) + tail
