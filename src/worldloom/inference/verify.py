"""The one verification core of fast decoding: cache marks and rewinds, and the acceptance rules.

Every drafting method (a draft model, prompt lookup, Medusa heads, the world model's frame head)
proposes tokens that the target model checks in one forward pass over them; what the target
would not have produced is thrown away, and the cache must forget it too.

    m = mark(cache)                         # before the verification forward
    out = model(tokens, cache)              # pending tokens + k drafts, one pass
    n, fix = accept(out.logits[:, -k-1:], drafts, dlen, temperature, ...)
    refeed = rewind(cache, m, keep)         # keep the accepted prefix

**Rewinding.** Attention layers keep a key and a value per position: the cache's ``length`` is cut
back and later writes overwrite the rest. A recurrent layer (Mamba, Mamba-2, RetNet, linear
attention) folds every position into one state, which cannot be cut: ``mark`` keeps the states
as they were (mixers replace ``cache.states[i]`` with a new state object and never write into
one, so keeping the references is a snapshot), and ``rewind`` restores them and the mark's
length; the accepted positions after the mark are then fed again by the next forward pass
(``rewind`` returns how many). The re-run rides along with the next verification's tokens, so
it costs no extra pass. Hybrids do both (their attention slots are overwritten by the re-run).

**Acceptance.** Greedy (temperature 0): a draft token stands while it equals the target's argmax;
the first mismatch is replaced by the target's argmax, and when every draft stands the target's
next token comes free. Sampling: speculative sampling (Leviathan et al. 2023; Chen et al. 2023):
draft token d at position i stands with probability min(1, p_i(d)/q_i(d)), where p is the target's
and q the drafter's distribution after the same temperature / top-k / top-p filters (a
deterministic drafter such as prompt lookup has q = one-hot); the first rejected position is
drawn from norm(max(0, p_i − q_i)); after the last draft, from p. Each emitted token is then
distributed as the target's own sample (tests/test_speculative.py checks it empirically).

A batch keeps one cache length, so every row keeps the smallest accepted count of the batch
(`emit`): a row that accepted more keeps its accepted draft at that position, which is its
target's token too, so nothing changes but the speed.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .sampling import probs


@dataclass
class Mark:
    """A cache as it was: its length and its recurrent layers' states (references; see the module doc)."""

    length: int
    states: list


def mark(cache) -> Mark:
    return Mark(cache.length, list(cache.states))


def is_recurrent(cache) -> bool:
    """Whether some layer of this cache keeps a recurrent state (which a rewind restores, not cuts)."""
    return any(s is not None for s in cache.states)


def rewind(cache, m: Mark, keep: int) -> int:
    """Make ``cache`` hold its first ``keep`` positions (m.length <= keep <= cache.length).

    Returns how many positions (after ``m.length``) the caller must feed again: 0 for an
    attention-only cache (its length is cut), keep - m.length when some layer is recurrent
    (states back to the mark)."""
    if not m.length <= keep <= cache.length:
        raise ValueError(f"cannot rewind to {keep} positions: the mark holds {m.length}, the cache {cache.length}")
    if is_recurrent(cache):
        cache.states = list(m.states)
        cache.length = m.length
        return keep - m.length
    cache.length = keep
    return 0


def accept(target_logits: torch.Tensor, draft: torch.Tensor, dlen: torch.Tensor, temperature: float, *,
           top_k: int = 0, top_p: float = 1.0, draft_probs: torch.Tensor | None = None,
           generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Accepted draft counts and the target's token after them, per row.

    target_logits (B, k+1, V): the target's logits at the position of the last emitted token and
    at each draft; draft (B, k) ids; dlen (B,) how many of each row's drafts are real (the rest is
    filler and never accepted); draft_probs (B, k, V) the drafter's distribution (None: a
    deterministic drafter). Returns n (B,) in 0..dlen and fix (B,): the target's token at
    position n (the correction of the first rejected draft, or the token after the last one)."""
    B, k = draft.shape
    real = torch.arange(k, device=draft.device)[None] < dlen[:, None]  # (B, k)
    if temperature == 0:
        choice = target_logits.argmax(-1)  # (B, k+1)
        n = ((draft == choice[:, :k]) & real).long().cumprod(1).sum(1)  # (B,)
        return n, choice.gather(1, n[:, None]).squeeze(1)
    p = probs(target_logits, temperature, top_k=top_k, top_p=top_p)  # (B, k+1, V)
    d = draft[..., None]  # (B, k, 1)
    p_d = p[:, :k].gather(-1, d).squeeze(-1)  # (B, k)
    q_d = draft_probs.gather(-1, d).squeeze(-1) if draft_probs is not None else torch.ones_like(p_d)
    u = torch.rand(B, k, generator=generator, device=draft.device)
    ok = (u * q_d < p_d) & real  # stands with probability min(1, p/q)
    n = ok.long().cumprod(1).sum(1)  # (B,)
    at = p.gather(1, n[:, None, None].expand(B, 1, p.shape[-1])).squeeze(1)  # (B, V): p at position n
    rejected = n < dlen  # the draft at n was refused: draw from the residual
    if bool(rejected.any()):
        nq = n.clamp(max=k - 1)[:, None, None].expand(B, 1, p.shape[-1])
        q_at = (draft_probs.gather(1, nq).squeeze(1) if draft_probs is not None
                else torch.nn.functional.one_hot(draft.gather(1, nq[:, :, 0]).squeeze(1), p.shape[-1]).float())
        resid = (at - q_at).clamp(min=0)
        mass = resid.sum(-1, keepdim=True)
        resid = torch.where(mass > 0, resid / mass.clamp(min=1e-30), at)  # p == q: rejection had probability 0
        at = torch.where(rejected[:, None], resid, at)
    return n, torch.multinomial(at, 1, generator=generator).squeeze(1)


def emit(draft: torch.Tensor, n: torch.Tensor, fix: torch.Tensor) -> torch.Tensor:
    """The tokens every row emits after one verification, (B, m+1) with m = min(n): the first m
    drafts, then each row's token at position m (its accepted draft where it accepted more, else its fix)."""
    m = int(n.min())
    at_m = draft[:, m] if m < draft.shape[1] else fix
    last = torch.where(n > m, at_m, fix)
    return torch.cat([draft[:, :m], last[:, None]], dim=1)


def compact(cache, start: int, slots: torch.Tensor) -> None:
    """Keep a tree's accepted path: the keys and values at cache slots ``slots`` (B, m) of each row
    move to slots start .. start+m-1 and the cache is cut there (a tree's nodes lie anywhere after
    ``start``; its accepted path becomes the contiguous sequence it stands for, each key already
    rotated at its depth's position). Attention-only caches: a tree is verified on those only."""
    if is_recurrent(cache):
        raise ValueError("a recurrent state cannot be compacted; verify a chain and rewind instead")
    B, m = slots.shape
    if m and not (start <= int(slots.min()) and int(slots.max()) < cache.length):
        raise ValueError(f"slots to keep must lie in {start}..{cache.length - 1}")
    for kv in (cache.k, cache.v):
        for t in kv:
            if t is not None and m:
                idx = slots[:, None, :, None].expand(B, t.shape[1], m, t.shape[3])  # (B, KV, m, D)
                t[:, :, start : start + m] = t.gather(2, idx)  # gathered first: overlapping moves are safe
    cache.length = start + m
