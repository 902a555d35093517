"""Lossless fast imagination: the frame head drafts the next observation, the model verifies it.

Token-by-token imagination (``mode="tokens"``) predicts the ``obs_len`` tokens of the next
observation with one single-token forward each. The frame head (``model.frame``) predicts all of
them from one hidden state, but its frame is not the model's own token-by-token answer (each of
its tokens is predicted without the ones before it). `imagine_frame` gets the token-by-token
answer at frame-head speed wherever the head is right:

1. the head drafts every token of the next observation from the hidden state after ``done``;
   the first token is the model's own choice from that same state (no draft needed);
2. one forward of the runner over the latest known token and the drafts after it gives the
   model's choice at every position (restricted to the ids the position may hold, as in
   ``tokens`` mode); the drafts that equal it stand (`worldloom.inference.verify.accept`),
   the first that does not is replaced by the model's choice;
3. the runner is cut back to what stands (`StreamRunner.rewind`: attention caches cut,
   recurrent states restored and the kept tokens fed again with the next verification);
4. the rest of the frame is drafted again and verified the same way until it is complete.

With every draft right a frame costs one forward (plus the head); with every draft wrong it
costs ``obs_len`` forwards, as token by token does (each longer, so slower there).

**Redrafting** (``redraft``): after a rejection, the drafts for the positions after the
correction are either the head's own (``"head"``) or the verification's choices there
(``"verify"``, as Jacobi decoding: the model's token at each later position given the drafts
before it, one of which was wrong). On small trained models ``verify`` needs fewer verifications
for a transformer and ``head`` for Mamba (docs/decoding.md, "Fast imagination"); ``verify`` is the default.

**Batched rows** accept different numbers of drafts, but the runner's cache has one length:
every row keeps the batch's smallest accepted count plus one token (`verify.emit`); a row that
accepted more keeps those tokens as drafts (they are its exact tokens, so they stand again).

**Sampling** (``greedy=False``): speculative sampling with the head's distribution (after the
same restriction) as the draft distribution: a draft d stands with probability min(1, p(d)/q(d)),
the first refused one is drawn from norm(max(0, p − q)) (`verify.accept`), so every imagined
token is distributed as ``tokens`` mode's sample (not the same draws: the random stream differs).
Drafts for the positions after the emitted ones are drawn afresh from the head each round (a
draft that already passed a test cannot be tested again without bias).

**Roll-over**: a verification feeds at most `StreamRunner.room` ids, so the runner rolls over at
exactly the token where ``tokens`` mode does, and the output stays exact past the context.

**Pace** (`Pace`, ``imagine_frame(pace=)``): drafting pays where a forward's cost hardly grows
with the ids it is given (batch 1 on a CPU reads the weights once either way). A large batch is
compute-bound: a verification over 64 rows × 53 drafts costs ~19 one-token steps, and 64 rows
keep the smallest accepted count, so drafting is slower than token by token there (BENCHMARKS.md:
0.34× at batch 64). A `Pace` times both ways at each batch size (a drafted frame when one runs;
one-token forwards from the caller's own action, reward and done feeds, `Pace.tokens`) and imagines
each frame the faster way (token by token: ``tokens`` mode's own loop, `tokens_frame`), drafting
again every ``retry`` frames to re-measure. Both ways give the same frames (greedy) or the same
distribution (sampled; other draws), so the choice changes only the speed.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np
import torch

from ...inference.sampling import restrict, sample
from ...inference.verify import accept, emit
from ...runtime import autocast
from .runner import StreamRunner

REDRAFTS = ("verify", "head")


@dataclass
class ImagineStats:
    """Counts of an imagination: steps imagined (per row batch), model forwards during them,
    frame-head passes, and (fast mode) verifications, drafts verified and drafts accepted (over rows)."""

    steps: int = 0
    forwards: int = 0
    frame_passes: int = 0
    verifications: int = 0
    drafted: int = 0
    accepted: int = 0
    token_frames: int = 0  # frames a `Pace` had imagined token by token (the faster way at that batch)

    @property
    def forwards_per_step(self) -> float:
        return self.forwards / self.steps if self.steps else 0.0

    @property
    def acceptance(self) -> float:
        """Drafts accepted / drafts verified (a draft checked again after a rejection counts again)."""
        return self.accepted / self.drafted if self.drafted else 0.0

    @property
    def verifications_per_frame(self) -> float:
        """Verification forwards per drafted frame (1: every draft right; obs_len: none)."""
        return self.verifications / self.frame_passes if self.frame_passes else 0.0

    def as_dict(self) -> dict:
        return {"steps": self.steps, "forwards": self.forwards, "forwards_per_step": round(self.forwards_per_step, 3),
                "frame_passes": self.frame_passes, "verifications": self.verifications,
                "verifications_per_frame": round(self.verifications_per_frame, 3), "drafted": self.drafted,
                "accepted": self.accepted, "acceptance": round(self.acceptance, 4), "token_frames": self.token_frames}


class Pace:
    """Frame by frame, drafts verified or token by token: the faster way at each batch size, by the clock.

    ``tokens(batch, seconds, n)``: n one-token steps (logits, pick, feed) took ``seconds``; the
    caller times those it makes anyway. ``drafts(batch, obs_len)``: whether the next frame is
    drafted: yes until both ways are timed, while a drafted frame costs no more than ``obs_len``
    one-token steps, and once every ``retry`` frames otherwise (to see whether that changed)."""

    def __init__(self, retry: int = 32):
        if retry < 1:
            raise ValueError(f"retry must be at least 1, got {retry}")
        self.retry = retry
        self.step_s: dict[int, float] = {}  # batch -> seconds of one one-token step (running mean)
        self.frame_s: dict[int, float] = {}  # batch -> seconds of the latest drafted frame
        self.since: dict[int, int] = {}  # batch -> token-by-token frames since the latest drafted one

    def tokens(self, batch: int, seconds: float, n: int = 1) -> None:
        one = seconds / max(n, 1)
        old = self.step_s.get(batch)
        self.step_s[batch] = one if old is None else 0.8 * old + 0.2 * one

    def drafts(self, batch: int, obs_len: int) -> bool:
        frame, step = self.frame_s.get(batch), self.step_s.get(batch)
        if frame is None or step is None or frame <= obs_len * step:
            return True
        self.since[batch] = self.since.get(batch, 0) + 1
        if self.since[batch] >= self.retry:
            self.since[batch] = 0
            return True
        return False

    def drafted(self, batch: int, seconds: float) -> None:
        self.frame_s[batch] = seconds


def tokens_frame(run: StreamRunner, h: torch.Tensor, temperature: float, generator=None,
                 pace: Pace | None = None) -> tuple[np.ndarray, torch.Tensor]:
    """The next observation (B, obs_len) token by token (``tokens`` mode) and the hidden state after it;
    ``pace`` learns how long a step took."""
    L = run.layout.obs_len
    obs = np.empty((run.batch, L), np.int64)
    t0 = time.perf_counter()
    for i in range(L):
        obs[:, i] = sample(run.logits(h), temperature, generator=generator).cpu().numpy()
        h = run.feed(obs[:, i : i + 1])[:, -1]
    if pace is not None:
        pace.tokens(run.batch, time.perf_counter() - t0, L)
    return obs, h


def check_fast(model) -> None:
    """ValueError (one line) unless the model has a frame head to draft with."""
    if getattr(model, "frame", None) is None:
        raise ValueError("fast imagination drafts with the frame head, which this model lacks (train with "
                         "stream.parallel_obs=true); use mode='tokens' for this model")


def _draft(head_logits: torch.Tensor, greedy: bool, generator) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Drafts (B, L) from the head's restricted logits (B, L, V), and their distribution (None: greedy)."""
    if greedy:
        return head_logits.argmax(-1), None
    q = head_logits.softmax(-1)  # (B, L, V), 0 outside each position's ids
    return torch.multinomial(q.flatten(0, 1), 1, generator=generator).view(q.shape[:2]), q


def _choices(run: StreamRunner, hs: torch.Tensor, first: int) -> torch.Tensor:
    """The model's restricted logits (B, n, V) at hidden states hs (B, n, C), which predict step
    positions first .. first+n-1 (the last may be the action after the frame)."""
    with autocast(run.precision, run.device):
        logits = run.model.logits_of(hs).float()
    return restrict(logits, run.layout.step_ranges[first : first + hs.shape[1]])


@torch.no_grad()
def imagine_frame(run: StreamRunner, h: torch.Tensor, greedy: bool = True, generator: torch.Generator | None = None,
                  stats: ImagineStats | None = None, redraft: str = "verify",
                  pace: Pace | None = None) -> tuple[np.ndarray, torch.Tensor]:
    """The next observation (B, obs_len) ids of every stream of ``run``, which is right after a
    ``done`` token whose hidden state is h (B, C), fed into the runner; returns it and the hidden
    state after its last token (B, C). Greedy: exactly ``tokens`` mode's frame (module doc).
    ``pace``: drafted or token by token, whichever is faster at this batch size (module doc)."""
    if redraft not in REDRAFTS:
        raise ValueError(f"redraft must be one of {', '.join(REDRAFTS)}, got {redraft!r}")
    stats = stats if stats is not None else ImagineStats()
    if pace is None:
        return _drafted_frame(run, h, greedy, generator, stats, redraft)
    if not pace.drafts(run.batch, run.layout.obs_len):
        stats.token_frames += 1
        return tokens_frame(run, h, 0.0 if greedy else 1.0, generator, pace)
    t0 = time.perf_counter()
    out = _drafted_frame(run, h, greedy, generator, stats, redraft)
    pace.drafted(run.batch, time.perf_counter() - t0)
    return out


def _drafted_frame(run: StreamRunner, h: torch.Tensor, greedy: bool, generator, stats: ImagineStats,
                   redraft: str) -> tuple[np.ndarray, torch.Tensor]:
    L = run.layout.obs_len
    draft, q = _draft(run.frame(h), greedy, generator)  # (B, L)
    stats.frame_passes += 1
    frame = draft.clone()
    frame[:, 0] = sample(run.logits(h), 0.0 if greedy else 1.0, generator=generator)  # the model's own first token
    temperature = 0.0 if greedy else 1.0
    p = 0  # frame[:, :p+1] is the model's; positions < p are fed
    refeed = np.zeros((run.batch, 0), np.int64)
    while True:
        r = refeed.shape[1]
        k = max(0, min(L - 1 - p, run.room() - r - 1))  # drafts this pass: never past a roll-over
        m = run.mark()
        fed = np.concatenate([refeed, frame[:, p : p + 1 + k].cpu().numpy()], axis=1)
        hs = run.feed(fed)[:, r:]  # (B, 1+k, C): at the known token and at each draft
        logits = _choices(run, hs, p + 1)  # (B, 1+k, V): positions p+1 .. p+1+k
        drafts = frame[:, p + 1 : p + 1 + k]
        n, fix = accept(logits, drafts, torch.full((run.batch,), k, device=drafts.device), temperature,
                        draft_probs=None if q is None else q[:, p + 1 : p + 1 + k], generator=generator)
        stats.verifications += 1
        stats.drafted += run.batch * k
        stats.accepted += int(n.sum())
        kept = emit(drafts, n, fix)  # (B, mm+1): tokens of positions p+1 .. p+1+mm
        mm = kept.shape[1] - 1
        if p + 1 + mm >= L:  # every draft stood: the frame is complete (the fix is the action's)
            return frame.cpu().numpy(), hs[:, -1]
        _redraft(frame, draft, q, logits, n, p, k, greedy, redraft, generator)
        frame[:, p + 1 : p + 2 + mm] = kept
        refeed = run.rewind(m, k - mm)  # the drafts after the kept ones
        p += 1 + mm


def _redraft(frame, draft, q, logits, n, p: int, k: int, greedy: bool, how: str, generator) -> None:
    """New drafts for the positions after the next known one (in place in ``frame``)."""
    if not greedy:  # fresh samples from the head: a draft that passed a test cannot be tested again
        frame[:, p + 2 :] = torch.multinomial(q[:, p + 2 :].flatten(0, 1), 1, generator=generator).view(frame.shape[0], -1)
        return
    w = min(k + 1, frame.shape[1] - p - 1)  # positions p+1 .. p+w (the last choice may be the action's)
    choice = logits[:, :w].argmax(-1)  # (B, w): the model's tokens given the drafts before them
    upto = torch.arange(w, device=n.device)[None] <= n[:, None]  # (B, w) exact: accepted drafts and the fix
    base = choice if how == "verify" else draft[:, p + 1 : p + 1 + w]
    frame[:, p + 1 : p + 1 + w] = torch.where(upto, choice, base)
