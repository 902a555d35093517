"""Planning in imagination: try the policy's likeliest first actions inside the world model, and
take another than the policy's own only when imagination confidently foresees it is better.

At a real step every stream ends right after its current observation. For each of the B real
streams and each of its K candidate first actions (the policy's ``top_k`` actions and its own
choice — K = 2 by default, 3 when a sampled choice lies outside the top 2 — or every action
with ``top_k=None``), `ImaginationPlanner` continues the stream with the model alone:

    a (candidate) -> r, d predicted -> o' predicted -> a' (the model's policy) -> r', d' -> ...

for ``horizon`` imagined steps, and scores the candidate by the predicted rewards (the expected
value of the reward-token distribution, discounted, nothing counted after a predicted end;
the likeliest reward token is what the imagined stream continues with). The next observation is
predicted token by token (greedy, each token restricted to the ids its position may hold), or,
with a frame head, in one pass (``mode``).

Planning that never hurts: the planner falls back on the policy. It acts on the policy's own
action (its argmax, or a sample with ``greedy=False``) unless ANOTHER first action passes every
test of `ImaginationPlanner.decide`:

1. it is among the policy's ``top_k`` likeliest actions (the world model has rarely or never
   seen what follows actions the expert does not take; its predictions there are not trusted);
2. one imagined step along it foresees a reward of at least ``confidence`` (expected value of
   the reward distribution): a success-sized event, not the fraction of one that a doubtful
   reward distribution gives, nor a sum of such fractions over the horizon (BENCHMARKS.md "Why
   planning still hurts": false alarms of 0.2-0.4 after turns made the agent loop). Rewards
   foreseen below ``confidence`` count for nothing in any return (the policy's action's too), so
   doubtful fractions can neither make a candidate nor tip a comparison. Made for sparse rewards
   such as BabyAI's single success reward; ``confidence=0`` turns it off;
3. its imagined return beats the imagined return of the policy's own action by more than
   ``margin`` (both imagined by the same model, so a bias shared by both cancels);
4. among those, the best; a tie with the policy's action goes to the policy.

So a planner whose imagination foresees nothing (or only doubtful rewards) acts exactly like
the plain policy, and one whose confident foresight is right can only trade the policy's action
for one that reaches reward sooner. What remains is the risk of a CONFIDENT wrong prediction
about one of the policy's top actions — the one thing a better world model has to remove.

Before imagining, the real runner makes room for the horizon (``make_room``: one roll-over of
its B rows, the same one it would do by itself a little later) so that the imagined streams
never need one. Otherwise the real runner is only read.

Batched: a scratch `StreamRunner` of B*K rows (row ``b*K + k`` = real stream b, candidate k)
is forked from the real runner (its cache rows copied, not recomputed), and then all B*K
imagined streams step together.

Cost per real step: a copy of B*K cache rows, then per imagined step three single-token forwards
(action, reward, done) and the next observation — ``obs_len`` single-token forwards
("tokens") or one frame-head pass plus one ``obs_len``-token forward ("parallel"); the last
imagined step skips the observation. With token-by-token frames and horizon 4 that is about
3*4 + 3*50 = 162 batched one-token forwards of B*K rows per real action; with the frame head,
3*4 + 3*2 = 18 forwards (the observation chunks are 50 tokens each). ``mode="fast"`` verifies the
frame head's observations token by token (worldloom.world.rollout.fast): the imagined streams are
exactly the token-by-token ones, at 18 forwards where the head's drafts are right (``stats``). Imagining only the
policy's top 2 instead of all 7 BabyAI actions makes those rows 3.5 times fewer.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np
import torch

from ...inference.sampling import sample
from .fast import ImagineStats, Pace, check_fast, imagine_frame, tokens_frame
from .runner import StreamRunner

MODES = ("auto", "tokens", "parallel", "fast")


@dataclass
class Imagined:
    """What the model foresaw for every (real stream, candidate first action)."""

    candidates: np.ndarray  # (B, K) env action indices tried first, per real stream
    rewards: np.ndarray  # (B, K, H) predicted reward of each imagined step
    ends: np.ndarray  # (B, K, H) bool: the imagined step was predicted to end the episode
    actions: np.ndarray  # (B, K, H) env actions of the imagined steps (the first is the candidate)


class ImaginationPlanner:
    """Chooses actions by imagining ``horizon`` steps ahead for every candidate first action.

    horizon: imagined steps per candidate (the candidate's step included).
    candidates: env action indices to try first (None: every action of the layout).
    greedy_rollout: after the first action, follow the policy's likeliest action (False: sample).
    discount: weight ``discount**t`` of the reward predicted t steps ahead.
    margin: how much better (in predicted return) a candidate must be than the policy's action to override it.
    confidence: the least reward one imagined step must foresee for a candidate to override the policy.
    greedy: the policy's own action is its argmax (False: a sample from it).
    top_k: only the policy's k likeliest candidates may override its action (None: any). The
        world model has rarely or never seen the consequences of actions the expert does not
        take, and its reward predictions for them are not to be trusted.
    mode: how imagined observations are predicted — "tokens" (token by token), "parallel"
        (the frame head, one pass; the model must have one), "fast" (the frame head's drafts
        verified: exactly "tokens", faster where the head is right, token by token where the clock
        says drafting is slower at this batch, `fast.Pace`, unless ``pace=False``; needs one too) or "auto"
        (parallel when the model has a frame head). ``stats`` (`ImagineStats`) counts imagined
        steps, forwards and (fast) drafts accepted.

    The rule that makes the policy's action stand unless imagination confidently knows better is
    in the module's docs and `decide`; ``decisions`` / ``overrides`` count the actions chosen and
    those that were not the policy's own.
    """

    def __init__(self, horizon: int = 4, candidates=None, greedy_rollout: bool = True, discount: float = 1.0,
                 mode: str = "auto", seed: int = 0, margin: float = 0.2, greedy: bool = True, top_k: int | None = 2,
                 confidence: float = 0.5, pace: bool = True):
        if horizon < 1:
            raise ValueError(f"horizon must be at least 1, got {horizon}")
        if mode not in MODES:
            raise ValueError(f"mode must be one of {', '.join(MODES)}, got {mode!r}")
        if not 0.0 <= discount <= 1.0:
            raise ValueError(f"discount must be in [0, 1], got {discount}")
        self.horizon, self.greedy_rollout, self.discount, self.mode = int(horizon), bool(greedy_rollout), float(discount), mode
        if margin < 0 or confidence < 0:
            raise ValueError(f"margin and confidence must be >= 0, got {margin} and {confidence}")
        self.margin, self.confidence, self.greedy = float(margin), float(confidence), bool(greedy)
        if top_k is not None and top_k < 1:
            raise ValueError(f"top_k must be at least 1 (or None), got {top_k}")
        self.top_k = top_k
        self.candidates = None if candidates is None else np.asarray(list(candidates), np.int64).reshape(-1)
        if self.candidates is not None and not len(self.candidates):
            raise ValueError("candidates must not be empty")
        self.generator = torch.Generator().manual_seed(seed)
        self.last_scores: np.ndarray | None = None  # (B, K) scores of the last choose()
        self.last_imagined: Imagined | None = None
        self.calls = 0
        self.decisions = 0  # real actions chosen (rows of every choose())
        self.overrides = 0  # of them, how many were not the policy's own action
        self.stats = ImagineStats()
        self.pace = Pace() if pace else None  # fast mode: drafted frames only where they are faster at this batch size

    # -- helpers
    def _candidates(self, layout) -> np.ndarray:
        cand = np.arange(layout.n_actions, dtype=np.int64) if self.candidates is None else self.candidates
        if cand.min() < 0 or cand.max() >= layout.n_actions:
            raise ValueError(f"candidate actions must be in [0, {layout.n_actions}), got {cand.tolist()}")
        return cand

    def _obs_mode(self, model) -> str:
        """How this model's imagined observations are predicted: "tokens", "parallel" or "fast"."""
        if getattr(model, "obs_decoder", None) is not None:
            return "parallel"  # encoded observations: whole frames are the only way this model predicts them
        has_frame = getattr(model, "frame", None) is not None
        if self.mode == "parallel" and not has_frame:
            raise ValueError("mode='parallel' needs a model with a frame head (train with stream.parallel_obs=true)")
        if self.mode == "fast":
            check_fast(model)
        if self.mode == "auto":
            return "parallel" if has_frame else "tokens"
        return self.mode

    @staticmethod
    def counted(imagined: Imagined) -> np.ndarray:
        """(B, K, H) predicted rewards, counting the step that ends an episode but nothing after."""
        ended_before = np.zeros_like(imagined.ends)
        ended_before[..., 1:] = np.cumsum(imagined.ends, axis=-1)[..., :-1] > 0
        return imagined.rewards * ~ended_before

    def score(self, imagined: Imagined) -> np.ndarray:
        """(B, K) discounted sum of the confident predicted rewards (those of at least ``confidence``),
        counting the step that ends an episode but nothing after."""
        r = self.counted(imagined)
        return (np.where(r >= self.confidence, r, 0.0) * self.discount ** np.arange(r.shape[-1])).sum(-1)

    # -- imagination
    @torch.no_grad()
    def imagine(self, runner: StreamRunner, h: torch.Tensor | None = None, cand: np.ndarray | None = None) -> Imagined:
        """Roll every (stream, candidate) pair ``horizon`` steps forward in the model; h (B, C) is the
        real runner's last hidden state (recomputed by a prefill when not given); cand (B, K) the
        env actions each stream tries first (None: every candidate action in every stream)."""
        lay, model = runner.layout, runner.model
        if runner.pos != lay.obs_len:
            raise ValueError(f"the planner acts right after an observation (stream position {lay.obs_len}), "
                             f"but the runner is at position {runner.pos}")
        if cand is None:
            cand = np.tile(self._candidates(lay), (runner.batch, 1))
        cand = np.asarray(cand, np.int64)
        B, K, H = runner.batch, cand.shape[1], self.horizon
        if cand.shape[0] != B:
            raise ValueError(f"cand needs one row of first actions per stream ({B}), got shape {cand.shape}")
        obs_mode = self._obs_mode(model)

        # room for the whole imagined horizon: at most one rebuild of the B real rows now, instead
        # of rebuilds of all B*K imagined rows inside the horizon
        rebuilt = runner.make_room(H * lay.step_len)
        if rebuilt is not None:
            h = rebuilt
        # row b*K + k: real stream b with candidate k; the fork copies the cache rows (no prefill)
        # and shares nothing mutable with the real runner
        scratch = runner.fork(np.repeat(np.arange(B), K), room=H * lay.step_len)
        if h is None:
            h = scratch.keep(np.arange(B * K))  # one prefill recomputes the last hidden states
        else:
            h = h.repeat_interleave(K, dim=0)

        rewards = np.zeros((B * K, H))
        ends = np.zeros((B * K, H), bool)
        actions = np.zeros((B * K, H), np.int64)
        before = scratch.forwards
        for t in range(H):
            self.stats.steps += 1
            if t == 0:
                act = cand.reshape(-1)  # row b*K + k
            else:
                act = lay.decode_action(sample(scratch.logits(h), 0.0 if self.greedy_rollout else 1.0,
                                                     generator=self.generator).cpu().numpy())
            actions[:, t] = act
            t0 = time.perf_counter()
            h = scratch.feed(lay.action_ids(act)[:, None])[:, -1]
            r_logits = scratch.logits(h)
            r_id = sample(r_logits, 0.0).cpu().numpy()
            rewards[:, t] = self.expected_reward(lay, r_logits)
            h = scratch.feed(r_id[:, None])[:, -1]
            d_id = sample(scratch.logits(h), 0.0).cpu().numpy()
            h = scratch.feed(d_id[:, None])[:, -1]
            if self.pace is not None:
                self.pace.tokens(B * K, time.perf_counter() - t0, 3)  # what a token-by-token frame's steps cost
            term, trunc = lay.decode_done(d_id)
            ends[:, t] = term | trunc
            if t == H - 1 or ends[:, : t + 1].any(axis=1).all():
                break
            if obs_mode == "parallel":  # the whole next observation from the hidden state after d
                obs = sample(scratch.frame(h), 0.0).cpu().numpy()  # (B*K, obs_len)
                self.stats.frame_passes += 1
                h = scratch.feed(obs)[:, -1]
            elif obs_mode == "fast":  # the same observation as token by token, from verified drafts (where faster)
                _, h = imagine_frame(scratch, h, stats=self.stats, pace=self.pace)
            else:
                _, h = tokens_frame(scratch, h, 0.0)
        self.stats.forwards += scratch.forwards - before
        return Imagined(cand, rewards.reshape(B, K, H), ends.reshape(B, K, H), actions.reshape(B, K, H))

    @staticmethod
    def expected_reward(layout, logits: torch.Tensor) -> np.ndarray:
        """(N,) expected reward under the reward-token distribution of logits (N, V)."""
        lo = layout.offset["reward"]
        ids = np.arange(lo, lo + layout.reward.vocab_size)
        probs = logits[:, lo : lo + len(ids)].float().softmax(-1).cpu().numpy()
        return probs @ np.asarray(layout.decode_reward(ids), np.float64)

    def decide(self, pref: torch.Tensor, scores: np.ndarray, peaks: np.ndarray | None = None,
               own: np.ndarray | None = None) -> np.ndarray:
        """(B,) index into the candidates: the policy's own choice unless another candidate passes
        every test of the module's rule (top_k, confidence, margin; ties to the policy).

        pref (B, K): the policy's logits over the candidates (which hold its top_k actions);
        scores (B, K): their imagined returns; peaks (B, K): the largest reward one imagined step
        foresees along each (None: the scores); own (B,): the policy's choice (None: drawn from pref)."""
        if own is None:
            own = sample(pref, 0.0 if self.greedy else 1.0, generator=self.generator).cpu().numpy()  # (B,)
        rows = np.arange(scores.shape[0])
        peaks = scores if peaks is None else peaks
        eligible = np.where(peaks >= self.confidence, scores, -np.inf)
        eligible[rows, own] = -np.inf  # the policy's own action needs no override
        if self.top_k is not None and self.top_k < scores.shape[1]:
            rank = (-pref).argsort(dim=1).argsort(dim=1).cpu().numpy()  # 0 = the policy's favourite
            eligible[rank >= self.top_k] = -np.inf
        best = eligible.argmax(axis=1)
        choice = np.where(eligible[rows, best] > scores[rows, own] + self.margin, best, own)
        self.decisions += len(rows)
        self.overrides += int((choice != own).sum())
        return choice

    def _columns(self, pref: torch.Tensor, own: np.ndarray) -> np.ndarray:
        """(B, K) indices into the candidate actions that each stream imagines: all of them, or only
        the policy's top_k and its own choice (a sampled choice may lie outside the top_k)."""
        B, A = pref.shape
        if self.top_k is None or self.top_k >= A:
            return np.tile(np.arange(A), (B, 1))
        order = (-pref).argsort(dim=1).cpu().numpy()  # (B, A) the policy's likeliest first
        cols = order[:, : self.top_k]
        outside = ~(cols == own[:, None]).any(1)
        if outside.any():  # one more column: the own choice where it is outside, else the next likeliest
            cols = np.concatenate([cols, np.where(outside, own, order[:, self.top_k])[:, None]], axis=1)
        return cols

    def choose(self, runner: StreamRunner, h: torch.Tensor) -> np.ndarray:
        """The env action (B,) for every real stream: the policy's own action unless another candidate's
        imagined return passes the tests of `decide`. Only the candidates that may be chosen are
        imagined: the policy's own action and (with top_k) its top_k actions."""
        lay = runner.layout
        rebuilt = runner.make_room(self.horizon * lay.step_len)  # see imagine()
        if rebuilt is not None:
            h = rebuilt
        actions = self._candidates(lay)
        pref = runner.logits(h, lay.obs_len)[:, torch.from_numpy(lay.action_ids(actions))]  # (B, A) the policy over them
        own = sample(pref, 0.0 if self.greedy else 1.0, generator=self.generator).cpu().numpy()  # (B,) index into actions
        cols = self._columns(pref, own)  # (B, K)
        imagined = self.imagine(runner, h, actions[cols])
        scores = self.score(imagined)  # (B, K)
        peaks = self.counted(imagined).max(-1)  # (B, K)
        rows = np.arange(len(cols))[:, None]
        choice = self.decide(pref[torch.from_numpy(rows), torch.from_numpy(cols)], scores, peaks,
                             own=(cols == own[:, None]).argmax(1))
        self.last_scores, self.last_imagined = scores, imagined
        self.calls += 1
        return actions[cols[rows[:, 0], choice]].astype(np.int64)
