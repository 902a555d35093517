"""Ring attention: causal attention over a sequence split across the ranks of a process group.

Long contexts do not fit one device because attention's activations grow with the sequence.
Ring attention (Liu, Zaharia & Abbeel 2023, "Ring Attention with Blockwise Transformers")
splits the sequence into W blocks, one per rank, and never gathers it again:

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

    So rank r does r+1 block products and the last rank does the most work. No rank ever holds
    more than two key/value blocks.

Zigzag layout (``layout="zigzag"``, load balance)
    Cut the sequence into 2W chunks and give rank r chunks r and 2W-1-r (one early, one late).
    Then every step costs every rank half a block product: against an earlier rank's keys both
    query chunks see that rank's first chunk only; against a later rank's, only the late query
    chunk sees anything, and it sees both chunks in full; the own block is causal (see
    ``_jobs``). The ring, the online softmax and the backward are the same; only which
    (query rows, key rows) sub-blocks are computed changes. The caller splits with
    ``split_sequence(..., layout="zigzag")`` and takes rotary positions from
    ``local_positions(..., layout="zigzag")`` (no longer one offset).

Online softmax
    Softmax needs the sum of exp(scores) over *all* keys, which no rank sees at once. Each block
    product gives a partial result: the block's normalised output ``o_b`` and its log-sum-exp
    ``lse_b = log sum_k exp(s_qk)`` (computed stably from the block's running row max). Two
    partial results merge exactly::

        lse = logaddexp(lse_a, lse_b)
        o   = o_a * exp(lse_a - lse) + o_b * exp(lse_b - lse)

    so the output after the last merge equals softmax over every visible key. All of this is
    fp32 whatever the inputs' dtype (autocast is switched off inside); the output is cast back
    at the end. Within a block the queries are processed in tiles of rows (``TILE_ELEMS``
    scores at a time), so the scores never take (Tl, Tl) memory per head at once either.

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

Around the layer, for a model trained this way: shift targets *before* splitting (the target
of a rank's last token is the next rank's first token), so split ``inputs`` and ``targets``
of the whole window alike; each rank's loss covers only its tokens, so normalise it by the
*global* token count and SUM parameter gradients over the sequence-parallel ranks (a DDP
all-reduce over the same group averages: multiply the local loss by W, or reduce yourself).
All ranks of one ring see the same batch rows (data parallelism is a separate group).

PyTorch's own path: on CUDA with NCCL, ``torch.distributed.tensor.experimental.context_parallel``
(torch 2.13, a prototype) does this for ``F.scaled_dot_product_attention`` itself: build a
``DeviceMesh("cuda", ...)`` over the context-parallel ranks, and run the model under
``with context_parallel(mesh, buffers=[input_ids, labels, rope_cos, rope_sin],
buffer_seq_dims=[1, 1, 0, 0]):`` — it shards those buffers along the sequence (with its own
head-tail load balancing: exactly this module's zigzag layout, rank r holding chunks r and
2W-1-r, so ``local_positions(..., layout="zigzag")`` are the positions of its shard) and swaps
SDPA's flash / efficient / cuDNN ops for ring versions; ``context_parallel_unshard`` gathers
outputs back. It intercepts only those CUDA ops (not ``_scaled_dot_product_flash_attention_for_cpu``,
the CPU kernel), so on CPU (gloo) this module is the path; on GPU the two give the same numbers
up to kernel rounding, and the built-in one (fused kernels, no Python tiling) should be preferred.
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


def _rotate(bufs: tuple[torch.Tensor, ...], ring: Ring, tag: int):
    """Start sending the (contiguous) tensors ``bufs`` to the next rank and receiving the
    previous rank's into new ones: (received tensors, works)."""
    recvs = tuple(torch.empty_like(b) for b in bufs)
    nxt, prev = (ring.rank + 1) % ring.world, (ring.rank - 1) % ring.world
    ops = [dist.P2POp(dist.isend, b, group=ring.group, tag=tag, group_peer=nxt) for b in bufs]
    ops += [dist.P2POp(dist.irecv, r, group=ring.group, tag=tag, group_peer=prev) for r in recvs]
    return recvs, dist.batch_isend_irecv(ops)


def _arrived(pending) -> tuple[torch.Tensor, ...]:
    recvs, works = pending
    for w in works:
        w.wait()
    return recvs


# ----------------------------------------------------------------------------- sequence split

LAYOUTS = ("contiguous", "zigzag")


def _chunks(layout: str, rank: int, world: int) -> tuple[int, list[int]]:
    """How many equal chunks the sequence is cut into, and which of them (in order) a rank holds:
    contiguous: W chunks, rank r holds chunk r; zigzag: 2W chunks, rank r holds r and 2W-1-r."""
    if layout == "contiguous":
        return world, [rank]
    if layout == "zigzag":
        return 2 * world, [rank, 2 * world - 1 - rank]
    raise ConfigError(f"unknown ring attention layout '{layout}'; choose one of: {', '.join(LAYOUTS)}")


def check_split(length: int, world: int, layout: str = "contiguous") -> int:
    """Tokens per rank for a sequence of ``length`` over ``world`` ranks; refuses uneven splits."""
    if world < 1:
        raise ConfigError(f"ring attention needs at least one rank, got {world}")
    n, _ = _chunks(layout, 0, world)
    if length < n or length % n:
        raise ConfigError(
            f"a sequence of {length} tokens does not split evenly into {n} chunks ({world} ranks, {layout} layout) "
            f"for ring attention; use a length that is a multiple of {n}"
        )
    return length // world


def split_sequence(x: torch.Tensor, group=None, dim: int = 1, layout: str = "contiguous") -> torch.Tensor:
    """This rank's tokens of ``x`` along ``dim`` (the sequence axis: 1 for (B, T, ...)): its
    contiguous block, or (zigzag) its two chunks r and 2W-1-r side by side (a copy)."""
    ring = ring_of(group)
    check_split(x.shape[dim], ring.world, layout)
    n, mine = _chunks(layout, ring.rank, ring.world)
    c = x.shape[dim] // n  # tokens per chunk
    parts = [x.narrow(dim, i * c, c) for i in mine]
    return parts[0] if len(parts) == 1 else torch.cat(parts, dim=dim)  # (..., t_local, ...)


@torch.no_grad()
def gather_sequence(x: torch.Tensor, group=None, dim: int = 1, layout: str = "contiguous") -> torch.Tensor:
    """Every rank's tokens of ``x`` put back in sequence order along ``dim`` (no gradient)."""
    ring = ring_of(group)
    parts = [x] if ring.world == 1 else [torch.empty_like(x) for _ in range(ring.world)]
    if ring.world > 1:
        dist.all_gather(parts, x.contiguous(), group=ring.group)
    n, _ = _chunks(layout, 0, ring.world)
    chunks = [None] * n
    for r, part in enumerate(parts):
        held = _chunks(layout, r, ring.world)[1]
        for i, piece in zip(held, part.chunk(len(held), dim=dim)):
            chunks[i] = piece
    return torch.cat(chunks, dim=dim)


def local_positions(t_local: int, group=None, device=None, layout: str = "contiguous") -> torch.Tensor:
    """Global token positions of this rank's tokens (for rotary): ``rank*t_local + arange(t_local)``,
    or (zigzag) the positions of its two chunks."""
    ring = ring_of(group)
    _, mine = _chunks(layout, ring.rank, ring.world)
    if t_local % len(mine):
        raise ConfigError(f"{layout} ring attention needs a multiple of {len(mine)} tokens per rank, got {t_local}")
    c = t_local // len(mine)  # tokens per chunk
    return torch.cat([torch.arange(i * c, (i + 1) * c, device=device) for i in mine])


def _jobs(mask: str, r: int, j: int, t: int) -> list[tuple[slice, slice, bool]]:
    """What rank r computes against rank j's keys: (query rows, key rows, diagonal) sub-blocks,
    for ``mask`` = the causal mask in a layout (contiguous, zigzag) or ``bidirectional``.

    bidirectional: every block in full, whatever the layout.
    contiguous: its own block causally, an earlier rank's in full, a later rank's not at all.
    zigzag (rank r holds chunks r and 2W-1-r, halves of t): its own two chunks as a causal
    block without the (first-half query, second-half key) quarter; an earlier rank j < r: both
    query chunks see j's first chunk only; a later rank: only the second query chunk, which
    comes after both of j's chunks, sees them in full. Every step costs half a block product."""
    every, h = slice(None), t // 2
    first, second = slice(0, h), slice(h, t)
    if mask == "bidirectional":
        return [(every, every, False)]
    if mask == "contiguous":
        return [(every, every, True)] if j == r else [(every, every, False)] if j < r else []
    if j == r:
        return [(first, first, True), (second, first, False), (second, second, True)]
    return [(every, first, False)] if j < r else [(second, every, False)]


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
    qt = q[:, :, :, a:b].reshape(B, KV, G * (b - a), D) * scale  # the group's query heads as extra rows
    s = (qt @ k.transpose(-1, -2)).view(B, KV, G, b - a, k.shape[2])
    if diagonal:
        rows = torch.arange(a, b, device=q.device)[:, None]
        s.masked_fill_(torch.arange(b, device=q.device)[None] > rows, float("-inf"))
    return s, k


def _attend_block(q, k, v, out, lse, scale: float, diagonal: bool) -> None:
    """Merge the attention of q (B, KV, G, T, D) over one key/value block (B, KV, S, D) into
    the running fp32 ``out`` (B, KV, G, T, D) and ``lse`` (B, KV, G, T), in place."""
    B, KV, G, T, D = q.shape
    for a, b in _tiles(T, B * KV * G * k.shape[2]):
        s, kt = _scores(q, k, a, b, scale, diagonal)
        lse_b = torch.logsumexp(s, dim=-1)  # (B, KV, G, b-a): max-shifted inside, stable
        p = s.sub_(lse_b[..., None]).exp_()  # the block's own softmax, in the scores' memory
        o_b = (p.view(B, KV, G * (b - a), -1) @ v[:, :, : kt.shape[2]]).view(B, KV, G, b - a, D)
        new = torch.logaddexp(lse[..., a:b], lse_b)
        keep, add = torch.exp(lse[..., a:b] - new), torch.exp(lse_b - new)  # weights of old and new parts
        out[..., a:b, :] = out[..., a:b, :] * keep[..., None] + o_b * add[..., None]
        lse[..., a:b] = new


def _grad_block(q, k, v, do, lse, delta, scale: float, diagonal: bool, dq, dkv) -> None:
    """Add this block's share of the gradients: dq (B, KV, G, T, D) for the local queries,
    dkv (2, B, KV, S, D) for the block's keys and values. All fp32, in place."""
    B, KV, G, T, D = q.shape
    for a, b in _tiles(T, B * KV * G * k.shape[2]):
        s, kt = _scores(q, k, a, b, scale, diagonal)
        n, rows = kt.shape[2], G * (b - a)
        p = s.sub_(lse[..., a:b, None]).exp_().view(B, KV, rows, n)  # final softmax on this block, in place
        do_t = do[:, :, :, a:b].reshape(B, KV, rows, D)
        dp = do_t @ v[:, :, :n].transpose(-1, -2)  # (B, KV, rows, n)
        ds = dp.sub_(delta[..., a:b].reshape(B, KV, rows, 1)).mul_(p)  # in dp's memory: two tiles live
        dq[:, :, :, a:b] += (ds @ kt).view(B, KV, G, b - a, D) * scale
        dkv[0, :, :, :n] += ds.transpose(-1, -2) @ q[:, :, :, a:b].reshape(B, KV, rows, D) * scale
        dkv[1, :, :, :n] += p.transpose(-1, -2) @ do_t


# ----------------------------------------------------------------------------- around the ring


def _grouped(q: torch.Tensor, kv_heads: int) -> torch.Tensor:
    """(B, H, T, D) -> (B, KV, G, T, D) fp32: query head h = kv * G + g shares key/value head kv."""
    B, H, T, D = q.shape
    return q.float().reshape(B, kv_heads, H // kv_heads, T, D)


def _ring_forward(q, kv, ring: Ring, scale: float, mask: str):
    """q (B, KV, G, T, D) fp32, kv = (k, v) each (B, KV, T, D): output (B, KV, G, T, D) and lse (B, KV, G, T), fp32."""
    out = torch.zeros_like(q)
    lse = torch.full(q.shape[:-1], float("-inf"), dtype=torch.float32, device=q.device)
    for i in range(ring.world):
        pending = _rotate(kv, ring, KV_TAG) if i + 1 < ring.world else None  # the next block is in flight ...
        k, v = kv[0].float(), kv[1].float()  # ... while this one (from rank r - i) is attended
        for qs, ks, diag in _jobs(mask, ring.rank, (ring.rank - i) % ring.world, q.shape[3]):
            _attend_block(q[..., qs, :], k[:, :, ks], v[:, :, ks], out[..., qs, :], lse[..., qs], scale, diag)
        if pending is not None:
            kv = _arrived(pending)
    return out, lse


def _ring_backward(q, kv, do, lse, delta, ring: Ring, scale: float, mask: str):
    """The gradients of q (grouped, fp32) and of this rank's k, v (stacked: (2, B, KV, T, D) fp32)."""
    dq = torch.zeros_like(q)
    dkv = torch.zeros((2, *kv[0].shape), dtype=torch.float32, device=q.device)  # block r's accumulator
    for i in range(ring.world):
        pending_kv = _rotate(kv, ring, KV_TAG) if i + 1 < ring.world else None
        if i > 0:
            (dkv,) = _arrived(pending_dkv)  # block (r - i)'s accumulator, from ranks r - i .. r - 1
        k, v = kv[0].float(), kv[1].float()
        for qs, ks, diag in _jobs(mask, ring.rank, (ring.rank - i) % ring.world, q.shape[3]):
            _grad_block(q[..., qs, :], k[:, :, ks], v[:, :, ks], do[..., qs, :], lse[..., qs], delta[..., qs],
                        scale, diag, dq[..., qs, :], dkv[:, :, :, ks])
        pending_dkv = _rotate((dkv,), ring, GRAD_TAG) if ring.world > 1 else None  # onwards; after step W-1: home
        if pending_kv is not None:
            kv = _arrived(pending_kv)
    return dq, (_arrived(pending_dkv)[0] if pending_dkv is not None else dkv)


class _RingAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, ring: Ring, scale: float, mask: str):
        qg = _grouped(q, k.shape[1])
        k, v = k.contiguous(), v.contiguous()  # sent as they are (no copy when already contiguous)
        with torch.autocast(q.device.type, enabled=False):  # fp32 inside, even under autocast
            out, lse = _ring_forward(qg, (k, v), ring, scale, mask)
        y = out.view(q.shape).to(q.dtype)
        ctx.save_for_backward(q, k, v, y, lse)
        ctx.ring, ctx.scale, ctx.mask = ring, scale, mask
        return y

    @staticmethod
    def backward(ctx, dy):
        q, k, v, y, lse = ctx.saved_tensors
        kv_heads = k.shape[1]
        do = _grouped(dy, kv_heads)
        delta = (do * _grouped(y, kv_heads)).sum(-1)  # (B, KV, G, T): rowsum(dO * O)
        with torch.autocast(q.device.type, enabled=False):
            dq, dkv = _ring_backward(_grouped(q, kv_heads), (k, v), do, lse, delta, ctx.ring, ctx.scale, ctx.mask)
        return dq.view(q.shape).to(q.dtype), dkv[0].to(k.dtype), dkv[1].to(v.dtype), None, None, None


def ring_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, group=None, scale: float | None = None,
                   layout: str = "contiguous", causal: bool = True) -> torch.Tensor:
    """Causal attention of this rank's queries over the keys/values of the whole ring.

    q (B, H, Tl, D); k, v (B, KV, Tl, D) with KV dividing H; every rank of ``group`` calls it
    with the same shapes for its own tokens, as ``split_sequence(..., layout=layout)`` gives
    them (contiguous: rank r = tokens r*Tl .. r*Tl+Tl-1), rotary already applied at their
    global positions (``local_positions``). Returns (B, H, Tl, D) in q's dtype, equal to those
    rows of ``F.scaled_dot_product_attention(..., is_causal=True)`` over the whole sequence.
    Differentiable; its backward communicates around the ring too, so every rank must call
    backward. ``scale`` defaults to 1/sqrt(D), as SDPA's. ``causal=False``: bidirectional
    attention (every key visible, e.g. for a fill-mask objective; the layout then only says
    which tokens a rank holds), equal to SDPA with ``is_causal=False``.
    """
    if q.dim() != 4 or k.shape != v.shape or k.dim() != 4:
        raise ConfigError(f"ring attention takes q (B, H, T, D) and k, v (B, KV, T, D); got {tuple(q.shape)}, "
                          f"{tuple(k.shape)}, {tuple(v.shape)}")
    (B, H, T, D), KV = q.shape, k.shape[1]
    if k.shape[0] != B or k.shape[2:] != (T, D):
        raise ConfigError(f"ring attention: k, v {tuple(k.shape)} do not match q {tuple(q.shape)} "
                          "in batch, length or head size")
    if H % KV:
        raise ConfigError(f"ring attention: {H} query heads cannot share {KV} key/value heads; KV must divide H")
    ring = ring_of(group)
    if layout == "zigzag" and T % 2:
        raise ConfigError(f"zigzag ring attention needs a multiple of 2 tokens per rank, got {T}")
    _chunks(layout, 0, ring.world)  # refuses an unknown layout
    mask = layout if causal else "bidirectional"
    return _RingAttention.apply(q, k, v, ring, D ** -0.5 if scale is None else float(scale), mask)
