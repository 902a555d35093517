"""Continue a batch of world streams with the model: the one place that feeds tokens at run time.

`StreamRunner` keeps, for B streams in lockstep, the mission prefix of each row and the
step tokens fed so far, a cache (any backbone: KV for attention, states for Mamba/RetNet),
and the position within the current step (so every fed token gets its slot). The acting
agent, the imagined environment and the planner all drive the model through it:

    runner.reset(prefixes, first_obs)          # prefill: <bos> mission <sep> obs_0
    a = sample(runner.logits(h), ...)          # the policy's action (logits constrained to action ids)
    h = runner.feed(action_ids)                # then reward, done, next observation ...

When a stream would outgrow the model's context, the cache is rebuilt from the mission
prefix and the most recent whole steps (about half the context), like the training windows.
The moment of that rebuild depends on the longest prefix in the batch, so a stream gives
exactly the same predictions batched and alone until its first rebuild, not necessarily after.
`keep(rows)` drops finished streams (re-prefilling the survivors), so a batch of
environments costs only as much as the ones still running.

Fast imagination (worldloom.world.rollout.fast) feeds drafted tokens and takes back the ones the
model would not have produced: `room()` says how many ids fit before the next roll-over (a
verification never straddles one, so roll-overs happen where token-by-token feeding has them),
`mark()` / `rewind(m, drop)` cut the streams back through `worldloom.inference.verify`.
`forwards` counts the model passes.
"""

from __future__ import annotations

import numpy as np
import torch

from ...inference import verify
from ...inference.sampling import restrict
from ...modality import backbone_positions
from ...runtime import autocast
from ..stream import PAD, StreamLayout


def steps_to_keep(context: int, prefix: int, partial: int, step: int) -> int:
    """Whole steps (``step`` model positions each) a roll-over keeps behind a prefix of ``prefix`` positions:
    about half the context, never more than fit beside ``partial`` positions that must also stay (the
    current partial step, room asked for); negative when even none fit. The one rule, shared with the
    PPO stage's stream windows (worldloom.world.rl.windows), which must reproduce it."""
    fit = (context - prefix - partial) // step
    return fit if fit < 0 else min(fit, max(1, (context // 2) // step))


class StreamRunner:
    def __init__(self, model, layout: StreamLayout, precision: str = "fp32", device: str | torch.device = "cpu"):
        self.model, self.layout = model, layout
        self.precision, self.device = precision, torch.device(device)
        self.context = model.cfg.context
        self.prefixes: list[np.ndarray] = []
        self.steps = np.zeros((0, 0), np.int64)  # (B, n) step tokens fed so far, all rows aligned
        self.cache = None
        self.dropped = np.zeros((0, 0), np.int64)  # (B, m) whole steps before `steps` that roll-overs dropped
        self._remembered = None  # (actions in dropped + steps, the layout's place memory of them) while no action is fed
        self.rebuilds = 0
        self.forwards = 0  # model passes so far (prefills included)

    @property
    def batch(self) -> int:
        return len(self.prefixes)

    def _positions(self, n_prefix: int, n_step_ids: int) -> int:
        """Model positions (the context's unit) of a prefix and step ids: the ids themselves, or fewer where
        the model encodes each observation as a few vectors (worldloom.modality)."""
        cfg = self.model.cfg
        return backbone_positions(n_prefix, n_step_ids, cfg.obs_len, self.layout.step_len, cfg.obs_vectors)

    @property
    def pos(self) -> int:
        """Position within the current step of the next token to feed (0 = first observation token)."""
        return self.steps.shape[1] % self.layout.step_len

    # -- feeding
    @torch.no_grad()
    def _forward(self, ids: np.ndarray, slots: np.ndarray, skip: np.ndarray) -> torch.Tensor:
        dev = self.device
        skip_t = torch.from_numpy(np.ascontiguousarray(skip)).to(dev) if self.model.skip_proj is not None else None
        extra = {"mission": self._missions()} if getattr(self.model, "reads_mission", False) else {}
        with autocast(self.precision, dev):
            out = self.model(torch.from_numpy(ids).to(dev), self.cache, torch.from_numpy(slots).to(dev), skip_t, head=False,
                             **extra)
        self.forwards += 1
        h, self.cache = out.hidden, out.cache
        return h

    def _missions(self) -> torch.Tensor:
        """Every row's mission prefix (B, P), left padded: for a model that reads the mission vector. Built once per
        list of prefixes (reset, keep and fork assign a new one), not on every fed token."""
        cached = getattr(self, "_missions_of", None)
        if cached is not None and cached[0] is self.prefixes:
            return cached[1]
        P = max(len(p) for p in self.prefixes)
        out = np.full((self.batch, P), PAD, np.int64)
        for b, p in enumerate(self.prefixes):
            out[b, P - len(p) :] = p
        self._missions_of = (self.prefixes, torch.from_numpy(out).to(self.device))
        return self._missions_of[1]

    def _skip(self, start: int, n: int) -> np.ndarray:
        """Step-skip ids (B, n) of step positions start .. start+n-1 (see LWM.hidden and StreamLayout.step_skip).
        A place rule reads the whole episode, also the steps a roll-over dropped (as `EpisodeData` and the PPO
        windows do); its memory changes only when an action joins the steps, so it is kept until one does."""
        lay = self.layout
        if self.model.skip_proj is None:
            return np.zeros((self.batch, n), np.int64)
        if lay.place_rule is None:
            return lay.step_skip(self.steps[:, : start + n])[:, start:]
        d = self.dropped.shape[1]
        history = np.concatenate([self.dropped, self.steps[:, : start + n]], axis=1)
        acted = (history.shape[1] + lay.step_len - lay.obs_len - 1) // lay.step_len  # actions in the history
        if self._remembered is None or self._remembered[0] != acted:
            self._remembered = (acted, lay.place_rule.remembered(history, lay.step_len))
        return lay.step_skip(history, self._remembered[1][:, : history.shape[1] + 1])[:, d + start :]

    def _prefill(self, keep_steps: int | None = None) -> torch.Tensor:
        """Rebuild the cache from every row's prefix and its last `keep_steps` whole steps (all if None)."""
        lay = self.layout
        n = self.steps.shape[1]
        if keep_steps is not None:
            whole = (n // lay.step_len) * lay.step_len
            start = max(0, whole - keep_steps * lay.step_len)
            self.dropped = np.concatenate([self.dropped, self.steps[:, :start]], axis=1)
            self.steps = self.steps[:, start:]
        P = max(len(p) for p in self.prefixes)
        L = P + self.steps.shape[1]
        ids = np.full((self.batch, L), PAD, np.int64)
        slots = np.zeros((self.batch, L), np.int64)
        pad = np.zeros(self.batch, np.int64)
        for b, p in enumerate(self.prefixes):
            pad[b] = P - len(p)
            ids[b, pad[b] : P] = p
        ids[:, P:] = self.steps
        slots[:, P:] = lay.slots_at(0, self.steps.shape[1])
        skip = np.zeros((self.batch, L), np.int64)
        skip[:, P:] = self._skip(0, self.steps.shape[1])
        self.cache = self.model.new_cache(self.batch, self.context, torch.from_numpy(pad).to(self.device))
        return self._forward(ids, slots, skip)

    def reset(self, prefixes: list[np.ndarray], first_obs: np.ndarray) -> torch.Tensor:
        """Start B streams: mission prefixes and first observation ids (B, obs_len). Returns the
        hidden state of the last position (B, C): the policy's input for the first action."""
        self.prefixes = [np.asarray(p, np.int64) for p in prefixes]
        self.steps = np.asarray(first_obs, np.int64).reshape(len(prefixes), -1)
        self.dropped = np.zeros((len(prefixes), 0), np.int64)
        self._remembered = None
        return self._prefill()[:, -1]

    def feed(self, ids: np.ndarray) -> torch.Tensor:
        """Append ids (B, n) to every stream; returns the hidden states of the new positions (B, n, C)."""
        ids = np.asarray(ids, np.int64).reshape(self.batch, -1)
        n = ids.shape[1]
        lay = self.layout
        P = max(len(p) for p in self.prefixes)
        if self._positions(P, self.steps.shape[1] + n) > self._capacity():  # full: keep the prefix and the latest steps
            self.rebuilds += 1
            self.steps = np.concatenate([self.steps, ids], axis=1)
            return self._prefill(self._steps_to_keep())[:, -n:]
        slots = lay.slots_at(self.pos, n)
        start = self.steps.shape[1]
        self.steps = np.concatenate([self.steps, ids], axis=1)
        return self._forward(ids, np.broadcast_to(slots, ids.shape).copy(), self._skip(start, n))

    def _capacity(self) -> int:
        return self.context if self.cache is None else min(self.context, self.cache.max_len)

    def room(self) -> int:
        """How many more step ids `feed` takes without rolling over (token streams: one position per id)."""
        P = max(len(p) for p in self.prefixes)
        return self._capacity() - self._positions(P, self.steps.shape[1])

    def mark(self) -> tuple[verify.Mark, int]:
        """The streams as they are now (before feeding drafts), for `rewind`."""
        return verify.mark(self.cache), self.steps.shape[1]

    def rewind(self, m: tuple[verify.Mark, int], drop: int) -> np.ndarray:
        """Take back the last ``drop`` step ids of every stream (fed since the mark ``m``, with no
        roll-over between; drop=0 does nothing, roll-over or not). Returns the ids (B, r) the caller
        must feed again before its next tokens: none for an attention cache (cut), the kept ones
        after the mark for a recurrent one (its states go back to the mark; worldloom.inference.verify)."""
        cache_mark, at = m
        fed = self.steps.shape[1]
        if drop == 0:
            return self.steps[:, fed:]
        keep = fed - drop
        refeed = verify.rewind(self.cache, cache_mark, cache_mark.length + keep - at)
        out = self.steps[:, at:keep] if refeed else self.steps[:, keep:keep]
        self.steps = self.steps[:, : at if refeed else keep]
        self._remembered = None  # a dropped action may come back as another
        return out

    def keep(self, rows, append: np.ndarray | None = None) -> torch.Tensor | None:
        """Continue only the given rows (e.g. the environments still running), optionally appending
        ids (len(rows), n) to them first; one re-prefill. Returns the last hidden states (B', C)."""
        rows = np.asarray(rows, np.int64)
        self.prefixes = [self.prefixes[r] for r in rows]
        self.steps = self.steps[rows]
        self.dropped = self.dropped[rows]
        self._remembered = None
        if append is not None:
            self.steps = np.concatenate([self.steps, np.asarray(append, np.int64).reshape(len(rows), -1)], axis=1)
        if not len(rows):
            self.cache = None
            return None
        P = max(len(p) for p in self.prefixes)
        over = self._positions(P, self.steps.shape[1]) > self.context
        return self._prefill(self._steps_to_keep() if over else None)[:, -1]

    def _steps_to_keep(self, room: int = 0) -> int:
        """Whole steps to keep behind the prefix when rebuilding: about half the context, and never
        more than fit with the current partial step (which is always kept) and `room` more tokens."""
        lay = self.layout
        P = max(len(p) for p in self.prefixes)
        partial = self._positions(0, self.steps.shape[1] % lay.step_len)
        step = self._positions(0, lay.step_len)
        keep = steps_to_keep(self.context, P, partial + self._positions(0, room), step)
        if keep < 0:
            raise ValueError(f"the mission prefix ({P} tokens), the current step and {room} more tokens do not fit "
                             f"in the model context {self.context}")
        return keep

    def make_room(self, n: int) -> torch.Tensor | None:
        """Make sure `n` more tokens fit without a rebuild (rebuilding now, once, if they would not).
        Returns the new last hidden states (B, C) after a rebuild, else None."""
        P = max(len(p) for p in self.prefixes)
        if self._positions(P, self.steps.shape[1] + n) <= self.context:
            return None
        self.rebuilds += 1
        return self._prefill(self._steps_to_keep(room=n))[:, -1]

    def fork(self, rows, room: int | None = None) -> "StreamRunner":
        """A new runner whose streams are copies of rows `rows` of this one (repeats allowed),
        sharing nothing mutable with it: the cache rows are copied, not recomputed. With `room`,
        its cache holds only that many more tokens (less to allocate; feeding more than that
        makes it roll over like any runner)."""
        rows = np.asarray(rows, np.int64)
        out = StreamRunner(self.model, self.layout, self.precision, self.device)
        out.context = self.context
        out.prefixes = [self.prefixes[r] for r in rows]
        out.steps = self.steps[rows].copy()
        out.dropped = self.dropped[rows].copy()
        if self.cache is not None:
            max_len = None if room is None else min(self.cache.max_len, self.cache.length + room)
            out.cache = self.cache.select(torch.from_numpy(rows).to(self.device), max_len)
        out.rebuilds = self.rebuilds
        return out

    # -- reading the model's predictions
    @torch.no_grad()
    def logits(self, h: torch.Tensor, pos: int | None = None) -> torch.Tensor:
        """Next-token logits (B, V) from hidden states (B, C), restricted to the ids allowed at step position
        `pos` (default: the next position to feed); every other id gets -inf."""
        pos = self.pos if pos is None else pos
        with autocast(self.precision, self.device):
            logits = self.model.logits_of(h).float()
        return restrict(logits, self.layout.step_ranges[pos])

    @torch.no_grad()
    def frame(self, h: torch.Tensor) -> torch.Tensor:
        """The frame head's logits (B, obs_len, V) for the whole next observation, each position
        restricted to its own ids."""
        prev = None
        if getattr(self.model, "obs_decoder", None) is not None:  # the decoder reads the latest whole observation of every row
            lay = self.layout
            n = self.steps.shape[1]
            start = ((n - lay.obs_len) // lay.step_len) * lay.step_len
            prev = torch.from_numpy(np.ascontiguousarray(self.steps[:, start : start + lay.obs_len])).to(self.device)
        with autocast(self.precision, self.device):
            logits = self.model.frame_logits(h, prev).float()
        return self.layout.mask_frame(logits)

