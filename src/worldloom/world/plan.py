"""Planning in imagination: try every first action inside the world model, act on the best.

At a real step every stream ends right after its current observation. For each of the B real
streams and each of K candidate first actions, `ImaginationPlanner` continues the stream with
the model alone:

    a (candidate) -> r, d predicted -> o' predicted -> a' (the model's policy) -> r', d' -> ...

for ``horizon`` imagined steps, and scores the candidate by the predicted rewards (decoded from
the reward tokens, discounted, nothing counted after a predicted end). The next observation is
predicted token by token (greedy, each token restricted to the ids its position may hold), or,
with a frame head, in one pass (``mode``). The best-scoring first action is taken; ties — e.g.
when no reward is predicted anywhere — go to the candidate the policy itself prefers (highest
policy logit), so a planner that foresees nothing acts exactly like the plain greedy policy.

Batched: a scratch `StreamRunner` of B*K rows (row ``b*K + k`` = real stream b, candidate k)
copies the real runner's prefixes and step tokens, is prefilled once, and then all B*K
imagined streams step together. The real runner is only read, never changed.

Cost per real step: one prefill of B*K rows (each as long as its real stream: mission prefix
plus the steps kept in the real cache), then per imagined step three single-token forwards
(action, reward, done) and the next observation — ``obs_len`` single-token forwards
("tokens") or one frame-head pass plus one ``obs_len``-token forward ("parallel"); the last
imagined step skips the observation. With token-by-token frames and horizon 4 that is about
1 prefill + 3*4 + 3*50 = 162 batched forwards of B*K rows per real action.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from .runner import StreamRunner, pick

MODES = ("auto", "tokens", "parallel")


@dataclass
class Imagined:
    """What the model foresaw for every (real stream, candidate first action)."""

    candidates: np.ndarray  # (K,) env action indices tried first
    rewards: np.ndarray  # (B, K, H) predicted reward of each imagined step
    ends: np.ndarray  # (B, K, H) bool: the imagined step was predicted to end the episode
    actions: np.ndarray  # (B, K, H) env actions of the imagined steps (the first is the candidate)


class ImaginationPlanner:
    """Chooses actions by imagining ``horizon`` steps ahead for every candidate first action.

    horizon: imagined steps per candidate (the candidate's step included).
    candidates: env action indices to try first (None: every action of the layout).
    greedy_rollout: after the first action, follow the policy's likeliest action (False: sample).
    discount: weight ``discount**t`` of the reward predicted t steps ahead.
    mode: how imagined observations are predicted — "tokens" (token by token), "parallel"
        (the frame head, one pass; the model must have one) or "auto" (parallel when the
        model has a frame head).
    """

    def __init__(self, horizon: int = 4, candidates=None, greedy_rollout: bool = True, discount: float = 1.0,
                 mode: str = "auto", seed: int = 0):
        if horizon < 1:
            raise ValueError(f"horizon must be at least 1, got {horizon}")
        if mode not in MODES:
            raise ValueError(f"mode must be one of {', '.join(MODES)}, got {mode!r}")
        if not 0.0 <= discount <= 1.0:
            raise ValueError(f"discount must be in [0, 1], got {discount}")
        self.horizon, self.greedy_rollout, self.discount, self.mode = int(horizon), bool(greedy_rollout), float(discount), mode
        self.candidates = None if candidates is None else np.asarray(list(candidates), np.int64).reshape(-1)
        if self.candidates is not None and not len(self.candidates):
            raise ValueError("candidates must not be empty")
        self.generator = torch.Generator().manual_seed(seed)
        self.last_scores: np.ndarray | None = None  # (B, K) scores of the last choose()
        self.last_imagined: Imagined | None = None
        self.calls = 0

    # -- helpers
    def _candidates(self, layout) -> np.ndarray:
        cand = np.arange(layout.n_actions, dtype=np.int64) if self.candidates is None else self.candidates
        if cand.min() < 0 or cand.max() >= layout.n_actions:
            raise ValueError(f"candidate actions must be in [0, {layout.n_actions}), got {cand.tolist()}")
        return cand

    def _parallel(self, model) -> bool:
        has_frame = getattr(model, "frame", None) is not None
        if self.mode == "parallel" and not has_frame:
            raise ValueError("mode='parallel' needs a model with a frame head (train with stream.parallel_obs=true)")
        return self.mode == "parallel" or (self.mode == "auto" and has_frame)

    def score(self, imagined: Imagined) -> np.ndarray:
        """(B, K) discounted sum of predicted rewards, counting the step that ends an episode but nothing after."""
        H = imagined.rewards.shape[-1]
        ended_before = np.zeros_like(imagined.ends)
        ended_before[..., 1:] = np.cumsum(imagined.ends, axis=-1)[..., :-1] > 0
        weight = self.discount ** np.arange(H)
        return (imagined.rewards * ~ended_before * weight).sum(-1)

    # -- imagination
    @torch.no_grad()
    def imagine(self, runner: StreamRunner, h: torch.Tensor | None = None) -> Imagined:
        """Roll every (stream, candidate) pair ``horizon`` steps forward in the model (h is unused:
        the scratch runner recomputes it in its prefill)."""
        lay, model = runner.layout, runner.model
        if runner.pos != lay.obs_len:
            raise ValueError(f"the planner acts right after an observation (stream position {lay.obs_len}), "
                             f"but the runner is at position {runner.pos}")
        cand = self._candidates(lay)
        B, K, H = runner.batch, len(cand), self.horizon
        parallel = self._parallel(model)

        scratch = StreamRunner(model, lay, runner.precision, runner.device)
        scratch.context = runner.context
        # row b*K + k: real stream b with candidate k (copies: the real runner's arrays stay untouched)
        h = scratch.reset([np.array(p, copy=True) for p in runner.prefixes for _ in range(K)],
                          np.repeat(runner.steps, K, axis=0))

        rewards = np.zeros((B * K, H))
        ends = np.zeros((B * K, H), bool)
        actions = np.zeros((B * K, H), np.int64)
        for t in range(H):
            if t == 0:
                act = np.tile(cand, B)
            else:
                act = lay.decode_action(pick(scratch.logits(h), self.greedy_rollout, self.generator))
            actions[:, t] = act
            h = scratch.feed(lay.action_ids(act)[:, None])[:, -1]
            r_id = pick(scratch.logits(h))
            h = scratch.feed(r_id[:, None])[:, -1]
            d_id = pick(scratch.logits(h))
            h = scratch.feed(d_id[:, None])[:, -1]
            rewards[:, t] = lay.decode_reward(r_id)
            term, trunc = lay.decode_done(d_id)
            ends[:, t] = term | trunc
            if t == H - 1 or ends[:, : t + 1].any(axis=1).all():
                break
            if parallel:  # the whole next observation from the hidden state after d
                obs = pick(scratch.frame(h))  # (B*K, obs_len)
                h = scratch.feed(obs)[:, -1]
            else:
                for _ in range(lay.obs_len):
                    tok = pick(scratch.logits(h))
                    h = scratch.feed(tok[:, None])[:, -1]
        return Imagined(cand, rewards.reshape(B, K, H), ends.reshape(B, K, H), actions.reshape(B, K, H))

    def choose(self, runner: StreamRunner, h: torch.Tensor) -> np.ndarray:
        """The env action (B,) for every real stream: the candidate with the best imagined return;
        ties go to the candidate the policy prefers at h."""
        lay = runner.layout
        policy = runner.logits(h, lay.obs_len).float().cpu().numpy()  # (B, V), action ids only
        imagined = self.imagine(runner, h)
        cand = imagined.candidates
        scores = self.score(imagined)  # (B, K)
        pref = policy[:, lay.action_ids(cand)]  # (B, K) the policy's logit for each candidate
        best = scores.max(axis=1, keepdims=True)
        tied = np.isclose(scores, best, rtol=0.0, atol=1e-6)
        choice = np.where(tied, pref, -np.inf).argmax(axis=1)
        self.last_scores, self.last_imagined = scores, imagined
        self.calls += 1
        return cand[choice].astype(np.int64)
