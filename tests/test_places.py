"""Places (worldloom.world.places): the step-skip input of a cell reads what was last seen at its world place."""

from __future__ import annotations

import gymnasium as gym
import numpy as np
import pytest
import torch

from worldloom.config import StreamConfig, build_config
from worldloom.errors import ConfigError, DataError
from worldloom.tokenize.grid import GridTokenizer
from worldloom.world.stream import StreamLayout

from conftest import TINY_WORLD, WORLD_ENV


def _layout(places: str = "minigrid") -> StreamLayout:
    return StreamLayout.build(["go to the red ball"], 7, StreamConfig(), GridTokenizer(), places=places)


def _walk(seed: int, n: int, actions: tuple[int, ...]):
    """A real GoToLocal walk of n random actions out of `actions`: the stream steps (n, step_len) it makes."""
    import minigrid  # noqa: F401

    lay = _layout()
    env = gym.make(WORLD_ENV)
    obs, _ = env.reset(seed=seed)
    rng = np.random.default_rng(seed)
    rows = []
    for _ in range(n):
        a = int(rng.choice(actions))
        ids = lay.encode_obs({"image": obs["image"][None], "direction": np.array([obs["direction"]])})[0]
        rows.append(np.concatenate([ids, lay.action_ids([a]), lay.reward_ids([0.0]), lay.done_ids([False], [False])]))
        obs, _, term, trunc, _ = env.step(a)
        if term or trunc:
            break
    return lay, np.stack(rows)


def test_the_codebook_is_minigrids():
    from minigrid.core.constants import DIR_TO_VEC, OBJECT_TO_IDX, STATE_TO_IDX
    from minigrid.core.actions import Actions

    from worldloom.world import places

    assert (places._UNSEEN, places._EMPTY, places._FLOOR, places._DOOR, places._GOAL, places._LAVA) == tuple(
        OBJECT_TO_IDX[k] for k in ("unseen", "empty", "floor", "door", "goal", "lava"))
    assert places._OPEN == STATE_TO_IDX["open"]
    assert (places._LEFT, places._RIGHT, places._FORWARD) == (Actions.left, Actions.right, Actions.forward)
    assert np.array_equal(places._DIR_VEC, np.stack(DIR_TO_VEC))


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_remembered_ids_match_what_a_real_walk_shows_again(seed):
    """In a real walk of turns and steps (nothing in the room changes), every cell of a later view whose place was
    seen before shows exactly the remembered id; the same cell of the previous view (the plain skip) often does not."""
    lay, steps = _walk(seed, 60, (0, 1, 2))
    S, C = lay.step_len, lay.place_rule.cells
    flat = steps.reshape(1, -1)
    skip = lay.step_skip(flat)[0]
    plain = _layout("").step_skip(flat)[0]
    agree = wrong = plain_wrong = 0
    for t in range(1, len(steps)):
        for c in range(C):
            target, q = steps[t, c], t * S + c
            if c == lay.place_rule.agent_cell or target < lay.offset["obs"] + lay.obs.n_colors * lay.obs.n_states:
                continue  # the agent's own cell; unseen cells (occluded now)
            got = skip[q - 1]  # input position q-1 carries the skip of target q
            if got:
                agree += got == target
                wrong += got != target
                plain_wrong += plain[q - 1] != target
    assert agree > 150 and wrong == 0
    assert plain_wrong > 50  # the test can tell a place from a cell


def test_a_blocked_step_and_other_actions_leave_the_agent_in_place():
    """Pick up, drop, toggle and bumping into walls do not move the agent: still every remembered id of a place the
    agent sees again is right, except where the action changed the cell in front (picked up, dropped, opened)."""
    lay, steps = _walk(5, 80, (0, 1, 2, 2, 2, 3, 5))
    S = lay.step_len
    skip = lay.step_skip(steps.reshape(1, -1))[0]
    front = lay.place_rule.front_cell
    checked = 0
    for t in range(1, len(steps)):
        if lay.place_rule.walkable_ahead(steps[t - 1 : t])[0] or steps[t - 1, lay.obs_len] != lay.action_ids([2])[0]:
            continue
        for c in range(lay.place_rule.cells):  # a blocked forward: the view is the previous one, cell for cell
            if c != front and steps[t, c] != lay.offset["obs"]:
                assert skip[t * S + c - 1] == steps[t - 1, c]
                checked += 1
    assert checked > 40


def test_without_a_rule_the_skip_is_the_same_cell_one_step_earlier():
    lay, steps = _walk(3, 5, (0, 1, 2))
    plain = _layout("")
    flat = steps.reshape(1, -1)
    skip = plain.step_skip(flat)[0]
    S = plain.step_len
    assert np.array_equal(skip[S - 1 :], flat[0, : flat.shape[1] - S + 1]) and not skip[: S - 1].any()
    seq = np.concatenate([plain.prefix("go to the red ball"), flat[0]])
    P = len(seq) - flat.shape[1]
    assert np.array_equal(plain.skip_ids(seq, P)[P:], skip) and not plain.skip_ids(seq, P)[:P].any()


def test_the_rule_is_causal():
    """The skip ids of the positions before any point do not change with what comes after it."""
    lay, steps = _walk(4, 12, (0, 1, 2))
    flat = steps.reshape(1, -1)
    whole = lay.step_skip(flat)[0]
    for n in (1, lay.obs_len, lay.obs_len + 1, lay.step_len + 7, 5 * lay.step_len + lay.obs_len + 1, flat.shape[1] - 3):
        assert np.array_equal(lay.step_skip(flat[:, :n])[0], whole[:n])


def test_config_and_environment_checks(tmp_path):
    with pytest.raises(ConfigError, match="stream.places"):
        StreamConfig(places=True, obs="encoded")
    with pytest.raises(ConfigError, match="stream.places"):
        StreamConfig(places=True, step_skip=False)
    from worldloom.world.task import place_rule_for

    cfg = build_config(None, ["recipe=world", "env.id=crafter", "stream.places=true"])
    with pytest.raises(DataError, match="place rule"):
        place_rule_for(cfg, GridTokenizer())


@pytest.fixture(scope="module")
def places_run(tmp_path_factory, world_dataset):
    from worldloom.run import load_world_run
    from worldloom.train import train

    out = tmp_path_factory.mktemp("placesrun")
    cfg = build_config(None, [*TINY_WORLD, f"data.path={world_dataset}", f"out_dir={out}", "name=places", "stream.places=true"])
    train(cfg, progress=False, log=lambda *a: None)
    return load_world_run(cfg.run_dir)


@torch.no_grad()
def test_imagination_through_the_cache_uses_the_same_skip_as_one_forward(places_run, world_dataset):
    """A run trained with places keeps its rule, and greedy imagination token by token through the cache equals
    the constrained argmax of one full forward over the same tokens with the layout's skip ids."""
    from worldloom.world.data.episodes import load_dataset
    from worldloom.world.rollout.imagine import BatchedWorldModelEnv

    model, lay = places_run.model, places_run.layout
    assert lay.places == "minigrid"
    ep = load_dataset(world_dataset).episodes("val")[0]
    sim = BatchedWorldModelEnv(model, lay, "tokens")
    sim.reset([ep.mission], {"image": ep.obs["image"][:1], "direction": ep.obs["direction"][:1]})
    for a in (0, 2, 1, 1, 2):
        sim.step([a])
    fed = sim.runner.steps[0]
    prefix = lay.prefix(ep.mission)
    P = len(prefix)
    ids = np.concatenate([prefix, fed])
    skip = lay.skip_ids(ids, P, sim.runner.dropped[0])  # (the window may have rolled over: the steps before it)
    assert np.array_equal(sim.runner._skip(0, len(fed)), skip[None, P:])
    slots = np.concatenate([np.zeros(P, np.int64), lay.slots_at(0, len(fed))])
    h = model(torch.from_numpy(ids)[None], None, torch.from_numpy(slots)[None], torch.from_numpy(skip)[None]).hidden
    logits = model.head(model.norm(h))[0].float()
    for j in range(P + lay.obs_len, len(ids) - 1):
        if (j + 1 - P) % lay.step_len == lay.obs_len:
            continue  # actions are the caller's
        lo, hi = lay.step_ranges[(j + 1 - P) % lay.step_len]
        assert lo + int(logits[j, lo:hi].argmax()) == ids[j + 1]


@torch.no_grad()
def test_after_a_roll_over_the_skip_still_reads_the_dropped_steps(places_run, world_dataset):
    """Past a context roll-over the runner's window loses its first steps, but the place memory does not: its skip
    ids are the layout's for the window with the dropped steps before it, and the next predictions are the argmax
    of one forward of the window with those ids."""
    from worldloom.world.data.episodes import load_dataset
    from worldloom.world.rollout.imagine import BatchedWorldModelEnv

    model, lay = places_run.model, places_run.layout
    ep = load_dataset(world_dataset).episodes("val")[1]
    sim = BatchedWorldModelEnv(model, lay, "tokens")
    sim.reset([ep.mission], {"image": ep.obs["image"][:1], "direction": ep.obs["direction"][:1]})
    k = 0
    while sim.runner.rebuilds == 0:
        sim.step([(0, 2, 2, 1)[k % 4]])
        k += 1
    sim.step([2])
    run = sim.runner
    assert run.dropped.shape[1] > 0 and run.dropped.shape[1] % lay.step_len == 0
    window, before = run.steps[0], run.dropped[0]
    prefix = lay.prefix(ep.mission)
    P = len(prefix)
    ids = np.concatenate([prefix, window])
    skip = lay.skip_ids(ids, P, before)
    assert np.array_equal(run._skip(0, len(window)), skip[None, P:])
    assert not np.array_equal(skip, lay.skip_ids(ids, P))  # the dropped steps matter
    slots = np.concatenate([np.zeros(P, np.int64), lay.slots_at(0, len(window))])
    h = model(torch.from_numpy(ids)[None], None, torch.from_numpy(slots)[None], torch.from_numpy(skip)[None]).hidden
    logits = model.head(model.norm(h))[0].float()
    n = len(ids)
    for j in range(n - lay.obs_len - 2, n - 1):  # the last step's r, d and o tokens
        lo, hi = lay.step_ranges[(j + 1 - P) % lay.step_len]
        assert lo + int(logits[j, lo:hi].argmax()) == ids[j + 1]


def test_training_windows_read_the_episode_before_them():
    """A window that starts after step 0 of a long episode gets the whole episode's skip ids for its steps; a layout
    without a place rule keeps its skip inside the window."""
    from worldloom.world.data.packing import EpisodeData
    from worldloom.world.stream import EpisodeTokens

    lay, steps = _walk(1, 30, (0, 1, 2))
    ep = EpisodeTokens(lay.prefix("go to the red ball"), steps, np.full(len(steps), -1))
    P, S = len(ep.prefix), lay.step_len
    for layout in (lay, _layout("")):
        data = EpisodeData(layout, [ep], [ep], StreamConfig(), step_skip=True)
        seq, P_, policy, *skip = data.row(ep, context=P + 5 * S - 1, start=7)
        assert P_ == P and len(seq) == P + 5 * S
        got = data.segment(seq, P, policy, *skip)[4]
        whole = layout.skip_ids(np.concatenate([ep.prefix, steps.reshape(-1)]), P)
        if layout.place_rule is not None:
            assert np.array_equal(got[P:], whole[P + 7 * S : P + 12 * S])
            assert np.array_equal(got, layout.skip_ids(seq, P, steps[:7].reshape(-1)))
            assert np.array_equal(got, layout.skip_ids(seq, P, steps[:7]))  # whole steps as (steps, step_len): PPO's rows
        else:
            assert not skip and np.array_equal(got, layout.skip_ids(seq, P)) and not got[P : P + S - 1].any()
