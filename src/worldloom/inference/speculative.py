"""Speculative decoding: a drafter proposes k tokens, the target verifies them in one forward pass.

    for tokens in speculative_ids(model, prompts, sc, LookupDrafter(), k=4, stats=stats): ...

yields (B,) next tokens like `decode.generate_ids` (which calls this when given a drafter), so
streaming, stop strings and batching work unchanged. Drafters:

- `ModelDrafter(draft_model)`: a smaller run with the same tokenizer decodes k tokens with its own
  cache (greedy, or sampled with the same settings, its distribution going to the acceptance rule);
- `LookupDrafter()`: prompt lookup (Saxena 2023): the longest n-gram (``max_ngram`` down to
  ``min_ngram``) that ends the row and occurs earlier in it proposes the tokens that followed it.
  No model, so when nothing matches it costs nothing: the step is a plain decoding step.

The number of drafts adapts (as transformers' assisted generation does): one more after a
verification that accepted all of them, one fewer (down to 1) after one that accepted none.
Acceptance, rewinds and the batch rule are `worldloom.inference.verify`'s.

`CachedModel` is a model with its cache over a growing token sequence: it feeds what the cache
has not seen (plus any drafts), rolls the window over when the context is full (the last
context/2 tokens prefilled again, as plain decoding does), and rewinds to an accepted prefix.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Iterator

import torch

from .sampling import probs
from .verify import Mark, accept, emit, mark, rewind


@dataclass
class SpecStats:
    """What `generate` prints at the end: verifications, drafted and accepted tokens."""

    verifications: int = 0
    drafted: int = 0  # draft tokens verified (summed over rows)
    accepted: int = 0  # of those, accepted
    emitted: int = 0  # tokens emitted per row, summed over verifications (accepted + 1 each)
    forwards: int = 0  # target forward passes (verifications and plain steps)
    tokens: int = 0  # tokens yielded per row

    @property
    def mean_accepted(self) -> float:
        """Tokens per verification (accepted drafts + the target's own), the speed-up's upper bound."""
        return self.emitted / self.verifications if self.verifications else 0.0

    @property
    def tokens_per_forward(self) -> float:
        return self.tokens / self.forwards if self.forwards else 0.0

    @property
    def acceptance(self) -> float:
        return self.accepted / self.drafted if self.drafted else 0.0


class CachedModel:
    """A model and its cache over the token sequence ``seq`` (B, L) left-padded by ``pad`` (B,).

    The cache holds seq positions offset .. offset + cache.length - 1. The window rolls over where
    plain decoding's does (`decode.generate_ids`): the prompt's last ``context`` tokens first, and
    when predicting a token would need more than ``context`` tokens, the last context/2 again;
    `room` says how many drafts fit before that, so verification never straddles a roll-over and
    greedy output stays token-for-token the plain one, past the context too."""

    def __init__(self, model, pad: torch.Tensor, amp=None):
        self.model, self.pad = model, pad
        self.ctx = model.cfg.context
        self.amp = amp or contextlib.nullcontext
        self.cache, self.offset, self.mark = None, 0, None

    def _offset_for(self, L: int) -> int:
        """The window start for predicting token L (what plain decoding would use)."""
        if self.cache is None:
            return max(0, L - self.ctx)
        return self.offset if L - self.offset <= self.ctx else L - max(1, self.ctx // 2)

    def room(self, L: int) -> int:
        """How many tokens after the L of the sequence can be fed with the window unchanged."""
        return self.ctx - (L - self._offset_for(L))

    def feed(self, seq: torch.Tensor, extra: torch.Tensor | None = None) -> torch.Tensor:
        """Logits (B, n, V) of the tokens of ``seq`` the cache has not seen, then ``extra`` (B, k)
        (drafts, at most `room`). Rolls the window over first when due; marks the cache before."""
        L = seq.shape[1]
        offset = self._offset_for(L)
        if self.cache is None or offset != self.offset:
            self.offset = offset
            self.cache = self.model.new_cache(seq.shape[0], self.ctx, (self.pad - offset).clamp(min=0))
        self.mark = mark(self.cache)
        ids = seq[:, self.offset + self.cache.length:]
        if extra is not None and extra.shape[1]:
            ids = torch.cat([ids, extra], dim=1)
        with self.amp():
            return self.model(ids, self.cache).logits

    def rewind(self, seq_len: int, at: Mark | None = None) -> None:
        """Keep the first ``seq_len`` positions of the sequence (at least those of the mark ``at``,
        by default the one made before the last feed)."""
        rewind(self.cache, at or self.mark, seq_len - self.offset)


class LookupDrafter:
    """Prompt lookup: the continuation of the latest earlier occurrence of the row's last n-gram."""

    deterministic = True

    def __init__(self, max_ngram: int = 3, min_ngram: int = 1):
        if not 1 <= min_ngram <= max_ngram:
            raise ValueError(f"need 1 <= min_ngram <= max_ngram, got {min_ngram}, {max_ngram}")
        self.max_ngram, self.min_ngram = max_ngram, min_ngram

    def start(self, pad: torch.Tensor, amp=None) -> None:
        self.pad = pad.tolist()

    def room(self, L: int) -> int:
        return 1 << 30

    def propose(self, seq: torch.Tensor, k: int, sc, generator) -> tuple[torch.Tensor, torch.Tensor, None]:
        B = seq.shape[0]
        draft = torch.zeros(B, k, dtype=torch.long)
        dlen = torch.zeros(B, dtype=torch.long)
        for b, row in enumerate(seq.tolist()):
            got = self._lookup(row[self.pad[b]:], k)
            draft[b, : len(got)] = torch.as_tensor(got, dtype=torch.long)
            dlen[b] = len(got)
        return draft.to(seq.device), dlen.to(seq.device), None

    def _lookup(self, row: list[int], k: int) -> list[int]:
        for n in range(min(self.max_ngram, len(row) - 1), self.min_ngram - 1, -1):
            tail = row[-n:]
            for s in range(len(row) - n - 1, -1, -1):  # the latest earlier occurrence first
                if row[s : s + n] == tail:
                    return row[s + n : s + n + k]
        return []

    def accepted(self, seq_len: int, n: int, k: int) -> None:
        pass


class ModelDrafter:
    """A draft model (same tokenizer) decoding k tokens with its own cache."""

    deterministic = False

    def __init__(self, model):
        self.model = model

    def start(self, pad: torch.Tensor, amp=None) -> None:
        self.cm = CachedModel(self.model, pad, amp)

    def room(self, L: int) -> int:
        return self.cm.room(L) + 1  # the last draft is never fed

    def propose(self, seq: torch.Tensor, k: int, sc, generator):
        toks, qs = [], []
        logits = self.cm.feed(seq)[:, -1]
        self.start_len, self.start_mark = seq.shape[1], mark(self.cm.cache)
        for i in range(k):
            if sc.temperature == 0:
                tok = logits.argmax(-1)
            else:
                q = probs(logits, sc.temperature, top_k=sc.top_k, top_p=sc.top_p)
                qs.append(q)
                tok = torch.multinomial(q, 1, generator=generator).squeeze(1)
            toks.append(tok)
            if i + 1 < k:
                with self.cm.amp():
                    logits = self.model(tok[:, None], self.cm.cache).logits[:, -1]
        draft = torch.stack(toks, 1)
        dlen = torch.full((seq.shape[0],), k, dtype=torch.long, device=seq.device)
        return draft, dlen, (torch.stack(qs, 1) if qs else None)

    def accepted(self, seq_len: int, n: int, k: int) -> None:
        """Forget the drafts the target refused (the cache holds seq + k-1 drafts)."""
        self.cm.rewind(self.start_len + min(n, k - 1), self.start_mark)


def speculative_ids(model, prompts: list[list[int]], sc, drafter, k: int = 4, autocast_ctx=None,
                    stats: SpecStats | None = None, adaptive: bool = True) -> Iterator[torch.Tensor]:
    """Yield the next token of every row, (B,), sc.max_new_tokens times (module doc)."""
    from ..decode import left_pad

    if k < 1:
        raise ValueError(f"the number of draft tokens must be at least 1, got {k}")
    stats = stats if stats is not None else SpecStats()
    gen = torch.Generator().manual_seed(sc.seed) if sc.seed is not None else None
    device = next(model.parameters()).device
    seq, pad = left_pad(prompts)
    seq, pad = seq.to(device), pad.to(device)
    target = CachedModel(model, pad, autocast_ctx)
    drafter.start(pad, autocast_ctx)
    k_now, left = k, sc.max_new_tokens
    while left > 0:
        L = seq.shape[1]
        kk = max(0, min(k_now, left - 1, target.room(L), drafter.room(L)))
        if kk > 0:
            draft, dlen, q = drafter.propose(seq, kk, sc, gen)
            kk = int(dlen.max())
            draft, q = draft[:, :kk], (q[:, :kk] if q is not None else None)
        if kk == 0:  # nothing to verify: a plain step
            draft = torch.zeros(seq.shape[0], 0, dtype=torch.long, device=device)
            dlen, q = torch.zeros(seq.shape[0], dtype=torch.long, device=device), None
        logits = target.feed(seq, draft)[:, -(kk + 1):]
        stats.forwards += 1
        n, fix = accept(logits, draft, dlen, sc.temperature, top_k=sc.top_k, top_p=sc.top_p,
                        draft_probs=q, generator=gen)
        out = emit(draft, n, fix)  # (B, m+1)
        m = out.shape[1] - 1
        target.rewind(seq.shape[1] + m)
        if kk > 0:
            drafter.accepted(seq.shape[1], m, kk)
            stats.verifications += 1
            stats.drafted += int(dlen.sum())
            stats.accepted += int(n.sum())
            stats.emitted += m + 1
            if adaptive:
                k_now = min(k, k_now + 1) if m == kk else max(1, k_now - 1) if m == 0 else k_now
        seq = torch.cat([seq, out], dim=1)
        for t in out[:, :left].unbind(1):
            yield t
        stats.tokens += min(left, out.shape[1])
        left -= out.shape[1]
