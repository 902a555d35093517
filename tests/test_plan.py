"""ImaginationPlanner: valid actions, the real runner left untouched, best imagined return wins, ties go to the policy."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from worldloom.run import load_world_run
from worldloom.world.rollout.agent import _stack, run_episodes
from worldloom.world.envs import make_adapter
from worldloom.world.rollout.plan import Imagined, ImaginationPlanner
from worldloom.world.rollout.runner import StreamRunner

from conftest import WORLD_ENV


@pytest.fixture(scope="module")
def world(world_run):
    return load_world_run(world_run)


def start(world, seeds=(11, 12), steps: int = 0):
    """A real runner on len(seeds) GoToLocal envs, optionally after `steps` real (forward) steps."""
    adapter = make_adapter(WORLD_ENV)
    envs = [adapter.make() for _ in seeds]
    obs = [e.reset(seed=s)[0] for e, s in zip(envs, seeds)]
    lay = world.layout
    runner = StreamRunner(world.model, lay)
    args = ([lay.prefix(adapter.mission(o)) for o in obs], lay.encode_obs(_stack(obs, adapter)))
    h = runner.reset(*args)
    tails = []
    for _ in range(steps):
        act = np.full(len(seeds), 2)  # forward
        nxt = [e.step(int(a))[0] for e, a in zip(envs, act)]
        tail = np.concatenate([np.stack([lay.action_ids(act), lay.reward_ids(np.zeros(len(seeds))),
                                         lay.done_ids(np.zeros(len(seeds), bool), np.zeros(len(seeds), bool))], 1),
                               lay.encode_obs(_stack(nxt, adapter))], axis=1)
        tails.append(tail)
        h = runner.feed(tail)[:, -1]
    for e in envs:
        e.close()
    return runner, h, args, tails


def policy_action(runner, h):
    return runner.layout.decode_action(runner.logits(h).argmax(-1).numpy())


@pytest.mark.parametrize("mode", ["tokens", "parallel", "auto"])
def test_choose_returns_valid_actions(world, mode):
    runner, h, _, _ = start(world, steps=1)
    planner = ImaginationPlanner(horizon=2, mode=mode, top_k=None)
    actions = planner.choose(runner, h)
    assert actions.shape == (2,) and actions.dtype == np.int64
    assert ((actions >= 0) & (actions < world.layout.n_actions)).all()
    K = world.layout.n_actions
    assert planner.last_scores.shape == (2, K)
    im = planner.last_imagined
    assert im.rewards.shape == im.ends.shape == im.actions.shape == (2, K, 2)
    assert (im.actions[:, :, 0] == np.arange(K)).all()  # every candidate tried first, in every stream
    # by default only the policy's top-2 actions are imagined, its favourite first
    top = ImaginationPlanner(horizon=2, mode=mode)
    top.choose(runner, h)
    order = runner.logits(h)[:, torch.from_numpy(world.layout.action_ids(np.arange(K)))].argsort(dim=1, descending=True)
    assert top.last_scores.shape == (2, 2)
    assert np.array_equal(top.last_imagined.actions[:, :, 0], order[:, :2].numpy())


def test_candidates_subset_and_bad_options(world):
    runner, h, _, _ = start(world)
    actions = ImaginationPlanner(horizon=1, candidates=[0, 1]).choose(runner, h)
    assert set(actions.tolist()) <= {0, 1}
    with pytest.raises(ValueError):
        ImaginationPlanner(mode="psychic")
    with pytest.raises(ValueError):
        ImaginationPlanner(horizon=0)
    with pytest.raises(ValueError):
        ImaginationPlanner(candidates=[99]).choose(runner, h)


def test_choose_does_not_change_the_real_runner(world):
    runner, h, args, tails = start(world, steps=2)
    twin = StreamRunner(world.model, world.layout)  # the same history, never planned on
    twin.reset(*args)
    for tail in tails:
        twin.feed(tail)
    steps, prefixes, cache = runner.steps.copy(), [p.copy() for p in runner.prefixes], runner.cache
    before = runner.logits(h).clone()
    ImaginationPlanner(horizon=1, mode="tokens").choose(runner, h)  # the horizon fits: no make_room roll-over
    assert np.array_equal(runner.steps, steps) and runner.cache is cache
    assert all(np.array_equal(a, b) for a, b in zip(runner.prefixes, prefixes))
    assert torch.equal(runner.logits(h), before)
    nxt = world.layout.action_ids(np.array([1, 2]))[:, None]  # the cache still continues the real streams
    torch.testing.assert_close(runner.feed(nxt)[:, -1], twin.feed(nxt)[:, -1])


def test_planner_drives_real_episodes(world):
    planner = ImaginationPlanner(horizon=2)  # auto: the fixture's model has a frame head
    res = run_episodes(world.model, world.layout, WORLD_ENV, [2_000_000, 2_000_001], envs=2, planner=planner)
    assert [r.seed for r in res] == [2_000_000, 2_000_001]
    assert all(r.length > 0 for r in res) and planner.calls > 0


def test_best_imagined_return_wins_and_ties_go_to_the_policy(world, monkeypatch):
    runner, h, _, _ = start(world, steps=1)
    lay = world.layout
    planner = ImaginationPlanner(horizon=2, mode="parallel", top_k=None)
    preferred = policy_action(runner, h)

    # no reward foreseen anywhere (all scores tie): the plain policy's action
    monkeypatch.setattr(ImaginationPlanner, "expected_reward", staticmethod(lambda layout, logits: np.zeros(len(logits))))
    assert np.array_equal(planner.choose(runner, h), preferred)

    # one first action (not the policy's) foresees reward 1 on its first imagined step
    K = lay.n_actions
    target = int((preferred[0] + 3) % K)
    calls = []

    def stub(layout, logits):
        out = np.zeros(len(logits))
        if not calls:  # the first imagined step: rows are b*K + k
            out[np.arange(len(logits)) % K == target] = 1.0
        calls.append(1)
        return out

    monkeypatch.setattr(ImaginationPlanner, "expected_reward", staticmethod(stub))
    assert np.array_equal(planner.choose(runner, h), [target, target])
    assert planner.last_scores[:, target].tolist() == [1.0, 1.0]
    # a gain smaller than the margin does not override the policy
    calls.clear()
    planner.margin = 2.0
    assert np.array_equal(planner.choose(runner, h), preferred)
    # nor does a candidate outside the policy's top-k
    calls.clear()
    planner.margin, planner.top_k = 0.05, 1
    assert np.array_equal(planner.choose(runner, h), preferred)


def test_expected_reward_is_the_mean_of_the_bins(world):
    lay = world.layout
    logits = torch.full((2, lay.vocab_size), -1e9)
    lo = lay.offset["reward"]
    logits[0, lo] = 0.0  # all mass on "exactly zero"
    logits[1, lo + lay.reward.n_bins] = 0.0  # all mass on the top bin
    logits[1, lo + 1] = 0.0  # and as much on the lowest non-zero bin
    exp = ImaginationPlanner.expected_reward(lay, logits)
    top, low = lay.decode_reward([lo + lay.reward.n_bins, lo + 1])
    np.testing.assert_allclose(exp, [0.0, (top + low) / 2], rtol=1e-6)


def test_choose_with_wrapped_imagination(world, monkeypatch):
    """The same through the Imagined result: reward later in the rollout counts, after a predicted end it does not."""
    runner, h, _, _ = start(world)
    planner = ImaginationPlanner(horizon=3, mode="parallel", top_k=None)
    real_imagine = planner.imagine
    preferred = policy_action(runner, h)
    K = world.layout.n_actions
    a, b = int((preferred[0] + 1) % K), int((preferred[0] + 2) % K)

    def fake(r, hh, cand=None):
        im = real_imagine(r, hh, cand)
        rew, ends = np.zeros_like(im.rewards), np.zeros_like(im.ends)
        rew[:, a, 2] = 0.5  # reward two steps later
        ends[:, b, 0] = True  # ends at once, then "reward" that must not count
        rew[:, b, 1] = 0.9
        return Imagined(im.candidates, rew, ends, im.actions)

    monkeypatch.setattr(planner, "imagine", fake)
    assert np.array_equal(planner.choose(runner, h), [a] * runner.batch)
    planner.discount = 0.5  # 0.5 * 0.25 = 0.125 beats 0 by the margin, but it is not a confident foresight
    assert np.array_equal(planner.choose(runner, h), preferred)
    planner.confidence, planner.margin = 0.1, 0.05  # once it counts as one, it wins
    assert np.array_equal(planner.choose(runner, h), [a] * runner.batch)


def test_score_counts_the_ending_step_only():
    p = ImaginationPlanner(horizon=3, discount=0.5)
    rew = np.array([[[1.0, 1.0, 1.0], [0.0, 1.0, 1.0]]])
    ends = np.array([[[False, False, False], [False, True, False]]])
    im = Imagined(np.arange(2), rew, ends, np.zeros((1, 2, 3), np.int64))
    np.testing.assert_allclose(p.score(im), [[1.75, 0.5]])
