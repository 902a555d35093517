"""The restated open-loop metric: imagined frames scored on the cells an earlier real observation showed."""

from __future__ import annotations

import numpy as np
import pytest

from worldloom.world.data.episodes import Episode
from worldloom.world.envs import make_adapter
from worldloom.world.eval.metrics import seen_cell_accuracy

FORWARD, RIGHT = 2, 1


def empty_room_episode(actions=(FORWARD, RIGHT)) -> Episode:
    """MiniGrid-Empty-8x8: the agent starts at (1, 1) facing east (+x) in an 8x8 room (walls on the border)."""
    env = make_adapter("MiniGrid-Empty-8x8-v0").make()
    obs, _ = env.reset(seed=0)
    assert tuple(env.unwrapped.agent_pos) == (1, 1) and env.unwrapped.agent_dir == 0
    images, dirs = [obs["image"]], [obs["direction"]]
    for a in actions:
        obs, *_ = env.step(a)
        images.append(obs["image"])
        dirs.append(obs["direction"])
    env.close()
    T = len(actions)
    return Episode(seed=0, mission="", obs={"image": np.stack(images), "direction": np.array(dirs, np.uint8)},
                   action=np.array(actions, np.int64), reward=np.zeros(T, np.float32), terminated=False,
                   truncated=False, random_action=np.zeros(T, bool))


def test_seen_cells_of_a_hand_made_episode():
    """Worked by hand. o_0 at (1,1) facing east covers x 1..7, y -2..4: its 35 in-grid places (x 1..7, y 0..4)
    are all visible in the empty room. After forward, at (2,1) facing east, the view covers x 2..8, y -2..4:
    the 30 in-grid places x 2..7, y 0..4 were all shown by o_0; the far row (x = 8) and the two columns
    y = -2, -1 lie outside the grid and never count. After a right turn, facing south from (2,1), the view
    covers x -1..5, y 1..7: the places seen before are x 1..5, y 1..4 — 20 cells; y 5..7 and x = 0 are new."""
    ep = empty_room_episode()
    mask = make_adapter("MiniGrid-Empty-8x8-v0").seen_cells([ep])[0]
    assert mask.shape == (3, 7, 7) and mask.dtype == bool
    assert mask.sum(axis=(1, 2)).tolist() == [0, 30, 20]
    # o_1, image[vx, vy] with the agent at (3, 6) looking "up": vy = 0 is x = 8 (outside), vx = 0, 1 are y < 0
    want1 = np.zeros((7, 7), bool)
    want1[2:, 1:] = True
    assert np.array_equal(mask[1], want1)
    # o_2, facing south: vy = 6..3 are y = 1..4 (seen), vy = 2..0 are y = 5..7 (new); vx = 0..4 are x = 5..1, vx = 5 is x = 0
    want2 = np.zeros((7, 7), bool)
    want2[:5, 3:] = True
    assert np.array_equal(mask[2], want2)


def test_shown_cells_count_only_the_first_observation():
    """Worked by hand. Turning right twice at (1, 1): o_0 faces east (in-grid places x 1..7, y 0..4), o_1 faces
    south (x 0..4, y 1..7), o_2 faces west (x 0..1, y 0..4: 10 places). Every earlier observation: o_0 showed
    x = 1, y 0..4 and o_1 added x = 0, y 1..4, so 9 of o_2's places count ((0, 0) no view showed). Shown o_0
    alone (open-loop imagination): the 5 places x = 1; the 4 that only real o_1 showed are not counted."""
    ep = empty_room_episode((RIGHT, RIGHT))
    adapter = make_adapter("MiniGrid-Empty-8x8-v0")
    every, first = adapter.seen_cells([ep])[0], adapter.seen_cells([ep], shown=1)[0]
    assert every.sum(axis=(1, 2)).tolist()[2] == 9
    assert first.sum(axis=(1, 2)).tolist()[2] == 5
    assert not (first & ~every).any() and np.array_equal(first[:2], every[:2])
    assert np.array_equal(adapter.seen_cells([ep], shown=3)[0], every)  # shown all: the full mask
    with pytest.raises(ValueError, match="at least 1"):
        adapter.seen_cells([ep], shown=0)


def test_seen_cells_none_when_the_replay_differs():
    ep = empty_room_episode()
    ep.obs["image"][1, 3, 3, 0] = 7  # a box the environment never showed
    assert make_adapter("MiniGrid-Empty-8x8-v0").seen_cells([ep]) == [None]


def test_seen_cell_accuracy_counts_only_seen_cells():
    ep = empty_room_episode()
    mask = make_adapter("MiniGrid-Empty-8x8-v0").seen_cells([ep])[0]
    real, dirs = ep.obs["image"][1:], ep.obs["direction"][1:]
    pred = real.copy()
    pred[0, 4, 0] = (5, 0, 0)  # o_1: a key on the far row, outside the grid (never seen): not scored
    pred[1, 6, 0] = (5, 0, 0)  # o_2: a key at a place no earlier observation showed: not scored
    exact, right, counted = seen_cell_accuracy(pred, real, dirs, dirs, mask[1:])
    assert exact.tolist() == [True, True] and right.tolist() == [30, 20] and counted.tolist() == [30, 20]
    # the old figure (every cell) calls both frames wrong
    assert not (pred == real).all(axis=(1, 2, 3)).any()
    pred[0, 2, 1] = (5, 0, 0)  # o_1: a key at a place o_0 showed empty: wrong
    exact, right, counted = seen_cell_accuracy(pred, real, dirs, dirs, mask[1:])
    assert exact.tolist() == [False, True] and right.tolist() == [29, 20]
    # a wrong direction makes the frame wrong even when every seen cell is right
    exact, right, _ = seen_cell_accuracy(real, real, dirs, (dirs + 1) % 4, mask[1:])
    assert exact.tolist() == [False, False] and right.tolist() == [30, 20]


@pytest.fixture(scope="module")
def run(world_run):
    from worldloom.run import load_world_run

    return load_world_run(world_run)


def test_open_loop_accuracy_with_seen_masks(run, world_dataset):
    """Every cell seen: the restated figures are the old ones; no cell seen: only the direction is scored;
    an episode the adapter cannot tell (None) is left out."""
    from worldloom.world.data.episodes import load_dataset
    from worldloom.world.rollout.imagine import open_loop_accuracy

    eps = load_dataset(world_dataset).episodes("val")[:5]
    lengths = np.array([ep.length for ep in eps])
    V = eps[0].obs["image"].shape[1]
    everything = [np.ones((ep.length + 1, V, V), bool) for ep in eps]
    res = open_loop_accuracy(run.model, run.layout, eps, horizons=(1, 4), batch=3, seen=everything)
    for v in res["horizons"].values():
        assert v["n_seen"] == v["n"] and v["frame_seen"] == v["frame"] and v["cell_seen"] == pytest.approx(v["cell"])
        assert v["cells_seen"] == v["n"] * V * V
    nothing = [np.zeros((ep.length + 1, V, V), bool) for ep in eps]
    nothing[2] = None
    res = open_loop_accuracy(run.model, run.layout, eps, horizons=(1, 4), batch=3, seen=nothing)
    for k, v in res["horizons"].items():
        assert v["n_seen"] == sum(1 for i, L in enumerate(lengths) if L >= int(k) and i != 2)
        assert v["cells_seen"] == 0 and v["cell_seen"] is None
    real = make_adapter(run.cfg.env.id).seen_cells(eps)
    res = open_loop_accuracy(run.model, run.layout, eps, horizons=(1, 4), batch=3, seen=real)
    for v in res["horizons"].values():
        if v["n"]:
            assert v["n_seen"] == v["n"] and v["frame"] <= v["frame_seen"] <= 1
    assert len(res["curve"]["frame_seen"]) == 4
    shown = make_adapter(run.cfg.env.id).seen_cells(eps, shown=1)
    res2 = open_loop_accuracy(run.model, run.layout, eps, horizons=(1, 4), batch=3, seen=real, shown=shown)
    for k, v in res2["horizons"].items():
        if v["n"]:  # fewer cells count, so a frame exact on the seen cells is exact on the shown ones
            assert v["n_shown"] == v["n"] and v["cells_shown"] <= v["cells_seen"] and v["frame_shown"] >= v["frame_seen"]
        assert v["frame_seen"] == res["horizons"][k]["frame_seen"]  # the other figures do not move
    assert res2["horizons"]["1"]["cells_shown"] == res2["horizons"]["1"]["cells_seen"]  # before o_1, o_0 is all there is


def test_open_loop_bound_of_a_collected_dataset(world_dataset):
    """benchmarks/open_loop_bound.py: after one step every counted cell's place was shown by o_0 (the bound is
    every frame); later, the frames it allows are those whose counted cells hold no object o_0 did not show."""
    import importlib.util
    from pathlib import Path

    spec = importlib.util.spec_from_file_location("olb", Path(__file__).parents[1] / "benchmarks" / "open_loop_bound.py")
    olb = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(olb)
    res = olb.bound(world_dataset, 12, horizons=(1, 3))
    ok1, n1 = res[1]
    assert n1 > 0 and ok1 == n1
    ok3, n3 = res[3]
    assert 0 <= ok3 <= n3 <= n1
