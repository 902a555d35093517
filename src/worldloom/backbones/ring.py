"""Ring attention: causal attention over a sequence split across the ranks of a process group.

Long contexts do not fit one device because attention's activations grow with the sequence.
Ring attention (Liu, Zaharia & Abbeel 2023, "Ring Attention with Blockwise Transformers")
splits the sequence into W contiguous blocks, one per rank, and never gathers it again:

Blocks
    With W ranks and a sequence of T tokens, rank r holds tokens ``r*Tl .. (r+1)*Tl - 1``
    (``Tl = T / W``): its queries, keys and values, each (B, H, Tl, D). Everything outside
    attention (embedding, norms, MLP, loss) is per token, so it runs on the local block alone.

Ring steps
    The key/value block travels around the ring: at step i (0 .. W-1) rank r holds the keys and
    values of rank ``j = (r - i) mod W``, attends to them, and passes them to rank r+1 while
    receiving rank r-1's (``batch_isend_irecv``; the next block is already in flight while
    this one is computed). Causality decides what each step computes:

    * j == r (step 0): the diagonal block, attended causally (key position <= query position);
    * j <  r (steps 1 .. r): an earlier block, attended in full;
    * j >  r (steps r+1 .. W-1): a later block, skipped (still passed on for the others).

    So rank r does r+1 block products: the last rank does the most work (a "zigzag" split that
    balances this is not implemented). No rank ever holds more than two key/value blocks.

Online softmax
    Softmax needs the sum of exp(scores) over *all* keys, which no rank sees at once. Each block
    product gives a partial result: the block's normalised output ``o_b`` and its log-sum-exp
    ``lse_b = log sum_k exp(s_qk)`` (computed stably from the block's running row max). Two
    partial results merge exactly::

        lse = logaddexp(lse_a, lse_b)
        o   = o_a * exp(lse_a - lse) + o_b * exp(lse_b - lse)

    so the output after the last merge equals softmax over every visible key. All of this is
    fp32 whatever the inputs' dtype; the output is cast back at the end. Within a block the
    queries are processed in tiles of rows (``TILE_ELEMS`` scores at a time), so the scores
    never take (Tl, Tl) memory per head at once either.

Backward (as FlashAttention's, around the ring)
    Only q, k, v, the output o and the per-row lse are saved; the attention probabilities are
    recomputed block by block: ``p = exp(s - lse)`` is the final softmax restricted to the block.
    With ``delta = rowsum(dO * o)``::

        dV_j += pᵀ dO      dS = p * (dO Vᵀ - delta)      dQ += dS K * scale      dK_j += dSᵀ Q * scale

    dQ stays home. dK_j, dV_j belong to rank j: an fp32 accumulator travels with block j around
    the ring, each rank adds its share, and one extra step brings it home (W passes for the
    gradients, W-1 for the keys/values). Again no rank holds more than two blocks.

Grouped-query heads are supported: k, v may have KV heads where KV divides H (query head h
uses key/value head ``h // (H // KV)``, as ``repeat_interleave``); the query heads of a group
are computed against the shared key/value head without repeating it, and their dK, dV summed.

Using it (the API an attention layer calls)::

    group = None                                   # the default group (torchrun), or a sub-group
    T_local = x_local.shape[1]                     # every rank the same
    pos = local_positions(T_local, group)          # rank*T_local .. rank*T_local + T_local - 1
    cos, sin = cos_table[pos], sin_table[pos]      # rotary at GLOBAL positions: offset by rank*T_local
    q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
    y = ring_attention(q, k, v, group)             # (B, H, T_local, D), causal over the whole sequence

Inputs are split with ``split_sequence`` (and outputs put back together, e.g. for a test,
with ``gather_sequence``). Without an initialised process group (or with a group of one)
``ring_attention`` is plain causal attention. Not supported: attention masks (padding),
dropout on the attention weights, KV caches (decoding runs on one rank).

PyTorch's own path: on CUDA with NCCL, ``torch.distributed.tensor.experimental.context_parallel``
(torch 2.13, a prototype) does this for ``F.scaled_dot_product_attention`` itself: build a
``DeviceMesh("cuda", ...)`` over the context-parallel ranks, and run the model under
``with context_parallel(mesh, buffers=[input_ids, labels, rope_cos, rope_sin],
buffer_seq_dims=[1, 1, 0, 0]):`` — it shards those buffers along the sequence (with its own
head-tail load balancing, so the shard of a rank is not contiguous) and swaps SDPA's flash /
efficient / cuDNN kernels for ring versions; ``context_parallel_unshard`` gathers outputs back.
It dispatches only the CUDA kernels, so on CPU (gloo) this module is the path; on GPU the two
give the same numbers up to kernel rounding, and the built-in one should be preferred there.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist

from ..errors import ConfigError

TILE_ELEMS = 1 << 20  # scores computed at once per block (1M fp32 = 4 MiB); bounds the working set


# ----------------------------------------------------------------------------- the ring


@dataclass(frozen=True)
class Ring:
    """Where this process sits: its rank in ``group`` and the group's size."""

    group: object  # a ProcessGroup, or None for a single process
    rank: int
    world: int


def ring_of(group=None) -> Ring:
    """The ring of ``group``; ``None`` means the default group if torch.distributed is
    initialised, else a ring of one (this process alone)."""
    if not (dist.is_available() and dist.is_initialized()):
        if group is not None:
            raise ConfigError("ring attention was given a process group but torch.distributed is not initialised")
        return Ring(None, 0, 1)
    rank = dist.get_rank(group)
    if rank < 0:
        raise ConfigError(f"ring attention: process {dist.get_rank()} is not a member of the process group it was given")
    return Ring(group, rank, dist.get_world_size(group))


KV_TAG, GRAD_TAG = 0, 1  # keys/values and their gradients travel the same links: keep them apart


def _rotate(buf: torch.Tensor, ring: Ring, tag: int):
    """Start sending ``buf`` to the next rank and receiving the previous rank's: (recv, works)."""
    recv = torch.empty_like(buf)
    ops = [
        dist.P2POp(dist.isend, buf, group=ring.group, tag=tag, group_peer=(ring.rank + 1) % ring.world),
        dist.P2POp(dist.irecv, recv, group=ring.group, tag=tag, group_peer=(ring.rank - 1) % ring.world),
    ]
    return recv, dist.batch_isend_irecv(ops)


def _arrived(pending) -> torch.Tensor:
    recv, works = pending
    for w in works:
        w.wait()
    return recv


# ----------------------------------------------------------------------------- sequence split


def check_split(length: int, world: int) -> int:
    """Tokens per rank for a sequence of ``length`` over ``world`` ranks; refuses uneven splits."""
    if world < 1:
        raise ConfigError(f"ring attention needs at least one rank, got {world}")
    if length < world or length % world:
        raise ConfigError(
            f"a sequence of {length} tokens does not split evenly over {world} ranks for ring attention; "
            f"use a length that is a multiple of {world}"
        )
    return length // world


def split_sequence(x: torch.Tensor, group=None, dim: int = 1) -> torch.Tensor:
    """This rank's contiguous block of ``x`` along ``dim`` (the sequence axis: 1 for (B, T, ...))."""
    ring = ring_of(group)
    t_local = check_split(x.shape[dim], ring.world)
    return x.narrow(dim, ring.rank * t_local, t_local)


@torch.no_grad()
def gather_sequence(x: torch.Tensor, group=None, dim: int = 1) -> torch.Tensor:
    """Every rank's block of ``x`` put back in rank order along ``dim`` (no gradient)."""
    ring = ring_of(group)
    if ring.world == 1:
        return x
    parts = [torch.empty_like(x) for _ in range(ring.world)]
    dist.all_gather(parts, x.contiguous(), group=ring.group)
    return torch.cat(parts, dim=dim)


def local_positions(t_local: int, group=None, device=None) -> torch.Tensor:
    """Global token positions of this rank's block (for rotary): ``rank*t_local + arange(t_local)``."""
    start = ring_of(group).rank * t_local
    return torch.arange(start, start + t_local, device=device)


# ----------------------------------------------------------------------------- one block, fp32


def _tiles(t: int, row_width: int):
    """Query row ranges [a, b) whose scores hold about TILE_ELEMS numbers."""
    step = max(1, TILE_ELEMS // max(1, row_width))
    return ((a, min(a + step, t)) for a in range(0, t, step))


def _scores(q, k, a: int, b: int, scale: float, diagonal: bool):
    """Scaled scores of query rows a..b-1 against the keys they may see: (B, KV, G, b-a, S).

    q is (B, KV, G, T, D), k (B, KV, S, D). On the diagonal block keys past row b-1 are never
    visible, so only keys 0..b-1 are used and the causal mask is applied to them."""
    B, KV, G, _, D = q.shape
    if diagonal:
        k = k[:, :, :b]
    qt = q[:, :, :, a:b].reshape(B, KV, G * (b - a), D)  # the group's query heads as extra rows
    s = (qt @ k.transpose(-1, -2)).view(B, KV, G, b - a, k.shape[2]) * scale
    if diagonal:
        rows = torch.arange(a, b, device=q.device)[:, None]
        s = s.masked_fill(torch.arange(b, device=q.device)[None] > rows, float("-inf"))
    return s, k


def _attend_block(q, k, v, out, lse, scale: float, diagonal: bool) -> None:
    """Merge the attention of q (B, KV, G, T, D) over one key/value block (B, KV, S, D) into
    the running fp32 ``out`` (B, KV, G, T, D) and ``lse`` (B, KV, G, T), in place."""
    B, KV, G, T, D = q.shape
    for a, b in _tiles(T, B * KV * G * k.shape[2]):
        s, kt = _scores(q, k, a, b, scale, diagonal)
        lse_b = torch.logsumexp(s, dim=-1)  # (B, KV, G, b-a): max-shifted inside, stable
        p = torch.exp(s - lse_b[..., None])  # the block's own softmax
        o_b = (p.view(B, KV, G * (b - a), -1) @ v[:, :, : kt.shape[2]]).view(B, KV, G, b - a, D)
        new = torch.logaddexp(lse[..., a:b], lse_b)
        out[..., a:b, :] = out[..., a:b, :] * torch.exp(lse[..., a:b] - new)[..., None] + o_b * torch.exp(lse_b - new)[..., None]
        lse[..., a:b] = new


def _grad_block(q, k, v, do, lse, delta, scale: float, diagonal: bool, dq, dkv) -> None:
    """Add this block's share of the gradients: dq (B, KV, G, T, D) for the local queries,
    dkv (2, B, KV, S, D) for the block's keys and values. All fp32, in place."""
    B, KV, G, T, D = q.shape
    for a, b in _tiles(T, B * KV * G * k.shape[2]):
        s, kt = _scores(q, k, a, b, scale, diagonal)
        n, rows = kt.shape[2], G * (b - a)
        p = torch.exp(s - lse[..., a:b, None]).view(B, KV, rows, n)  # final softmax on this block
        do_t = do[:, :, :, a:b].reshape(B, KV, rows, D)
        dp = do_t @ v[:, :, :n].transpose(-1, -2)  # (B, KV, rows, n)
        ds = p * (dp - delta[..., a:b].reshape(B, KV, rows, 1))
        dq[:, :, :, a:b] += (ds @ kt).view(B, KV, G, b - a, D) * scale
        dkv[0, :, :, :n] += ds.transpose(-1, -2) @ q[:, :, :, a:b].reshape(B, KV, rows, D) * scale
        dkv[1, :, :, :n] += p.transpose(-1, -2) @ do_t


# ----------------------------------------------------------------------------- around the ring


def _grouped(q: torch.Tensor, kv_heads: int) -> torch.Tensor:
    """(B, H, T, D) -> (B, KV, G, T, D) fp32: query head h = kv * G + g shares key/value head kv."""
    B, H, T, D = q.shape
    return q.float().reshape(B, kv_heads, H // kv_heads, T, D)


def _ring_forward(q, kv, ring: Ring, scale: float):
    """q (B, KV, G, T, D) fp32, kv (2, B, KV, T, D): output (B, KV, G, T, D) and lse (B, KV, G, T), fp32."""
    out = torch.zeros_like(q)
    lse = torch.full(q.shape[:-1], float("-inf"), dtype=torch.float32, device=q.device)
    for i in range(ring.world):
        pending = _rotate(kv, ring, KV_TAG) if i + 1 < ring.world else None  # the next block is in flight ...
        j = (ring.rank - i) % ring.world
        if j <= ring.rank:  # ... while this one is attended (later ranks' blocks are skipped)
            _attend_block(q, kv[0].float(), kv[1].float(), out, lse, scale, diagonal=j == ring.rank)
        if pending is not None:
            kv = _arrived(pending)
    return out, lse


def _ring_backward(q, kv, do, lse, delta, ring: Ring, scale: float):
    """The gradients of q (grouped, fp32) and of this rank's k, v ((2, B, KV, T, D) fp32)."""
    dq = torch.zeros_like(q)
    dkv = torch.zeros(kv.shape, dtype=torch.float32, device=q.device)  # block r's accumulator
    for i in range(ring.world):
        pending_kv = _rotate(kv, ring, KV_TAG) if i + 1 < ring.world else None
        j = (ring.rank - i) % ring.world
        if i > 0:
            dkv = _arrived(pending_dkv)  # block j's accumulator, from ranks j .. r-1
        if j <= ring.rank:
            _grad_block(q, kv[0].float(), kv[1].float(), do, lse, delta, scale, j == ring.rank, dq, dkv)
        pending_dkv = _rotate(dkv, ring, GRAD_TAG) if ring.world > 1 else None  # onwards; after step W-1: home
        if pending_kv is not None:
            kv = _arrived(pending_kv)
    return dq, (_arrived(pending_dkv) if pending_dkv is not None else dkv)


class _RingAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, ring: Ring, scale: float):
        qg = _grouped(q, k.shape[1])
        kv = torch.stack((k, v))  # (2, B, KV, T, D): one message per ring step
        out, lse = _ring_forward(qg, kv, ring, scale)
        y = out.view(q.shape).to(q.dtype)
        ctx.save_for_backward(q, kv, y, lse)
        ctx.ring, ctx.scale = ring, scale
        return y

    @staticmethod
    def backward(ctx, dy):
        q, kv, y, lse = ctx.saved_tensors
        kv_heads = kv.shape[2]
        do = _grouped(dy, kv_heads)
        delta = (do * _grouped(y, kv_heads)).sum(-1)  # (B, KV, G, T): rowsum(dO * O)
        dq, dkv = _ring_backward(_grouped(q, kv_heads), kv, do, lse, delta, ctx.ring, ctx.scale)
        return dq.view(q.shape).to(q.dtype), dkv[0].to(kv.dtype), dkv[1].to(kv.dtype), None, None


def ring_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, group=None, scale: float | None = None) -> torch.Tensor:
    """Causal attention of this rank's queries over the keys/values of the whole ring.

    q (B, H, Tl, D); k, v (B, KV, Tl, D) with KV dividing H; every rank of ``group`` calls it
    with the same shapes for its own contiguous block (rank r = tokens r*Tl .. r*Tl+Tl-1,
    rotary already applied at those global positions). Returns (B, H, Tl, D) in q's dtype,
    equal to rows r*Tl .. of ``F.scaled_dot_product_attention(..., is_causal=True)`` over the
    whole sequence. Differentiable; its backward communicates around the ring too, so every
    rank must call backward. ``scale`` defaults to 1/sqrt(D), as SDPA's.
    """
    if q.dim() != 4 or k.shape != v.shape or k.dim() != 4:
        raise ConfigError(f"ring attention takes q (B, H, T, D) and k, v (B, KV, T, D); got {tuple(q.shape)}, "
                          f"{tuple(k.shape)}, {tuple(v.shape)}")
    (B, H, T, D), KV = q.shape, k.shape[1]
    if k.shape[0] != B or k.shape[2:] != (T, D):
        raise ConfigError(f"ring attention: k, v {tuple(k.shape)} do not match q {tuple(q.shape)} in batch, length or head size")
    if H % KV:
        raise ConfigError(f"ring attention: {H} query heads cannot share {KV} key/value heads; KV must divide H")
    return _RingAttention.apply(q, k, v, ring_of(group), D ** -0.5 if scale is None else float(scale))
