"""Planning that never hurts, on a scripted toy world where the right action is known.

A corridor of cells 0..L with the goal at L: actions back (-1), forward (+1) and wait. Reaching the
goal ends the episode with reward 1 - 0.9 t / max_steps, as in BabyAI. The scripted policy goes
forward (back second) except at its "trap" cells, where it prefers back (forward second); wait is
always its third choice. A greedy
policy stuck on a trap walks back and forth until the step limit. The planner is the real
`ImaginationPlanner.choose` (its scoring and decision rule); only its imagination is scripted:

- ``exact``: the toy world itself, candidate first and the greedy policy after it (a perfect world model);
- ``blind``: no reward foreseen anywhere;
- ``doubtful``: only false alarms, of 0.35 expected reward after every back step (below the confidence);
- ``off_policy``: only a confident false alarm, after "wait", which the policy ranks third (outside top_k);
- ``pessimist``: every return foreseen lower than the truth (halved, so never confident);
- ``noisy``: the truth plus both kinds of false alarm.
"""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch

from worldloom.world.rollout.plan import Imagined, ImaginationPlanner

BACK, FORWARD, WAIT = 0, 1, 2
L, MAX_STEPS = 6, 18


class ToyLayout:
    n_actions, obs_len, step_len = 3, 1, 4

    @staticmethod
    def action_ids(actions):
        return np.asarray(actions, np.int64)


class ToyRunner:
    """What choose() reads of a StreamRunner: the layout, make_room and the policy's logits. The
    "hidden state" h is the toy state itself: (B, 2) positions and steps taken."""

    layout = ToyLayout()

    def __init__(self, traps):
        self.traps = set(traps)

    def make_room(self, n):
        return None

    def policy(self, pos) -> np.ndarray:
        """(B, 3) logits: forward then back, or at a trap back then forward; wait always third."""
        return np.array([[3.0, 2.0, 0.0] if int(p) in self.traps else [1.0, 3.0, 0.0] for p in pos])

    def logits(self, h, pos=None):
        return torch.from_numpy(self.policy(h[:, 0].numpy()))


def step(pos, t, action):
    """-> (pos, t, reward, terminated) of one real step."""
    pos = max(0, pos + (1 if action == FORWARD else -1 if action == BACK else 0))
    t += 1
    if pos >= L:
        return pos, t, 1 - 0.9 * t / MAX_STEPS, True
    return pos, t, 0.0, False


class ScriptedPlanner(ImaginationPlanner):
    def __init__(self, kind: str, **kw):
        super().__init__(**kw)
        self.kind = kind

    def imagine(self, runner, h, cand=None):
        cand = np.tile(np.arange(3), (len(h), 1)) if cand is None else cand
        (B, K), H = cand.shape, self.horizon
        self.imagined_rows = B * K
        rewards, ends = np.zeros((B, K, H)), np.zeros((B, K, H), bool)
        actions = np.zeros((B, K, H), np.int64)
        for b, k in itertools.product(range(B), range(K)):
            pos, t = int(h[b, 0]), int(h[b, 1])
            for j in range(H):
                a = int(cand[b, k]) if j == 0 else int(runner.policy([pos])[0].argmax())
                actions[b, k, j] = a
                pos, t, r, end = step(pos, t, a)
                rewards[b, k, j], ends[b, k, j] = self.foresee(a, r), end
                if end:
                    break
        return Imagined(cand, rewards, ends, actions)

    def foresee(self, action: int, reward: float) -> float:
        true = reward if self.kind in ("exact", "noisy") else reward / 2 if self.kind == "pessimist" else 0.0
        if action == BACK and self.kind in ("doubtful", "noisy"):
            return 0.35
        if action == WAIT and self.kind in ("off_policy", "noisy"):
            return 0.9
        return true


def play(traps, planner=None, start: int = 0):
    """One episode from `start`: (success, return, actions taken)."""
    runner = ToyRunner(traps)
    pos, t, taken = start, 0, []
    while t < MAX_STEPS:
        h = torch.tensor([[pos, t]])
        a = int(planner.choose(runner, h)[0]) if planner else int(runner.policy([pos])[0].argmax())
        taken.append(a)
        pos, t, r, end = step(pos, t, a)
        if end:
            return True, r, taken
    return False, 0.0, taken


TRAPS = [(), (5,), (4,), (2,), (1, 5), (3, 4), (2, 3, 5), (5, 4, 3, 2, 1, 0)]
KINDS = ["exact", "noisy", "blind", "doubtful", "off_policy", "pessimist"]


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("horizon", [1, 2, 4])
def test_planner_never_below_the_plain_policy(kind, horizon):
    for traps, start in itertools.product(TRAPS, range(L)):
        ok, ret, taken = play(traps, start=start)
        p_ok, p_ret, p_taken = play(traps, ScriptedPlanner(kind, horizon=horizon), start=start)
        assert p_ok >= ok and p_ret >= ret - 1e-12, (kind, horizon, traps, start)
        if kind not in ("exact", "noisy"):  # nothing confidently right foreseen: exactly the policy
            assert p_taken == taken, (kind, traps, start)


def test_planner_beats_the_policy_where_imagination_is_right_and_the_policy_wrong():
    """A trap next to the goal: the policy loops back and forth until the step limit; the planner sees
    forward reach the goal and takes it. With horizon 3 it also gets past a trap three cells from the goal."""
    assert play((5,))[0] is False
    ok, ret, taken = play((5,), ScriptedPlanner("exact", horizon=1))
    assert ok and taken == [FORWARD] * L and ret == pytest.approx(1 - 0.9 * L / MAX_STEPS)
    assert play((3,))[0] is False and not play((3,), ScriptedPlanner("exact", horizon=2))[0]
    assert play((3,), ScriptedPlanner("exact", horizon=3))[0]
    wins = sum(play(traps, ScriptedPlanner("exact", horizon=4), start=s)[0] > play(traps, start=s)[0]
               for traps, s in itertools.product(TRAPS, range(L)))
    assert wins >= 10


def test_each_safeguard_is_what_keeps_the_policy():
    """Without the confidence floor the doubtful false alarm takes over; without top_k the off-policy one
    does; and then the planner does worse than the policy: the safeguards are what the guarantee rests on."""
    traps = ()
    assert play(traps)[0]
    loose = ScriptedPlanner("doubtful", horizon=1, confidence=0.0)
    ok, _, taken = play(traps, loose, start=2)
    assert BACK in taken and not ok  # false alarms walk it back
    anything = ScriptedPlanner("off_policy", horizon=1, top_k=None)
    ok, _, taken = play(traps, anything, start=2)
    assert taken[0] == WAIT and not ok
    # ties go to the policy: an equal foresight never overrides, even with no margin at all
    tie = ScriptedPlanner("exact", horizon=1, margin=0.0, confidence=0.0)
    assert tie.decide(torch.tensor([[1.0, 3.0, 0.0]]), np.array([[0.7, 0.7, 0.7]])).tolist() == [FORWARD]


def test_decide_rule_by_hand():
    p = ImaginationPlanner(margin=0.2, confidence=0.5, top_k=2)
    pref = torch.tensor([[3.0, 2.0, 0.0], [3.0, 2.0, 0.0], [3.0, 2.0, 0.0], [3.0, 2.0, 0.0]])  # policy: 0, then 1, then 2
    scores = np.array([[0.0, 0.9, 0.0],    # 1 foresees a success: override
                       [0.0, 0.4, 0.0],    # below the confidence: policy
                       [0.6, 0.75, 0.0],   # beats the policy's 0.6 by less than the margin: policy
                       [0.0, 0.0, 0.95]])  # 2 is outside the policy's top-2: policy
    assert p.decide(pref, scores).tolist() == [1, 0, 0, 0]
    with pytest.raises(ValueError):
        ImaginationPlanner(confidence=-1)


def test_overrides_are_counted():
    p = ImaginationPlanner(margin=0.2, confidence=0.5, top_k=2)
    pref = torch.tensor([[3.0, 2.0, 0.0], [3.0, 2.0, 0.0]])
    p.decide(pref, np.array([[0.0, 0.9, 0.0], [0.0, 0.1, 0.0]]))
    assert (p.decisions, p.overrides) == (2, 1)


def test_only_the_policys_top_actions_are_imagined():
    """Greedy: the policy's top-2 per stream; sampled: its own draw too when it lies outside them."""
    p = ScriptedPlanner("exact", horizon=1)
    p.choose(ToyRunner((5,)), torch.tensor([[5, 0], [2, 0]]))
    assert p.imagined_rows == 4 and p.last_imagined.candidates.tolist() == [[BACK, FORWARD], [FORWARD, BACK]]
    everything = ScriptedPlanner("exact", horizon=1, top_k=None)
    everything.choose(ToyRunner(()), torch.tensor([[2, 0]]))
    assert everything.imagined_rows == 3
    own = np.array([WAIT, FORWARD])  # a sampled WAIT is imagined beside the top-2; a row without one gets the 3rd likeliest
    cols = p._columns(torch.tensor([[1.0, 3.0, 0.0], [1.0, 3.0, 0.0]]), own)
    assert cols.tolist() == [[FORWARD, BACK, WAIT], [FORWARD, BACK, WAIT]]
    assert p._columns(torch.tensor([[1.0, 3.0, 0.0]]), np.array([FORWARD])).tolist() == [[FORWARD, BACK]]
