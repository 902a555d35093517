"""Imagination: the world model as an environment (worldloom.world.rollout.imagine)."""

from __future__ import annotations

import copy
import itertools

import gymnasium as gym
import numpy as np
import pytest
import torch

from gymnasium.utils.env_checker import check_env
from PIL import Image

from worldloom.world.data.episodes import load_dataset
from worldloom.world.rollout.imagine import (
    BatchedWorldModelEnv,
    WorldModelEnv,
    imagination_throughput,
    imagined_vs_real,
    open_loop_accuracy,
    write_rollout_gif,
)
from worldloom.world.stream import PAD

_ids = itertools.count()


@pytest.fixture(scope="module")
def run(world_run):
    from worldloom.run import load_world_run

    return load_world_run(world_run)


@pytest.fixture(scope="module")
def val_episodes(world_dataset):
    return load_dataset(world_dataset).episodes("val")


def _first(episodes):
    return ([ep.mission for ep in episodes],
            {"image": np.stack([ep.obs["image"][0] for ep in episodes]),
             "direction": np.stack([ep.obs["direction"][0] for ep in episodes])})


# ------------------------------------------------------------------ gymnasium env


def test_check_env_passes_with_a_spec_and_rendering(world_run):
    """Registered (so check_env has a spec: it then checks reset/step determinism and every render mode)."""
    env_id = f"worldloom-test/Imagined{next(_ids)}-v0"
    gym.register(env_id, entry_point="worldloom.world.rollout.imagine:WorldModelEnv", kwargs={"run": str(world_run)})
    try:
        env = gym.make(env_id, render_mode="rgb_array")
        assert env.unwrapped.spec is not None and env.unwrapped.spec.nondeterministic is False
        check_env(env.unwrapped, skip_render_check=False)
        env.close()
    finally:
        gym.registry.pop(env_id, None)


@pytest.mark.parametrize("backbone", ["mamba", "mamba2", "retnet", "hybrid"])
def test_every_backbone_drives_the_same_world_model_env(run, backbone):
    """The same WorldModelEnv (cache inside) over an (untrained) model of another backbone: observations
    stay in the observation space and the same seed replays the same imagined frames (reset clears
    the recurrent states). gymnasium's checker needs a trained model (an untrained one may predict
    "truncated" at step 1, which the checker rejects); that cached states give the cache-free result
    is test_world's fork-vs-fresh-prefill test."""
    from worldloom.model import LWM

    mc = copy.deepcopy(run.cfg.model)
    mc.backbone = backbone
    mc.layers = ",".join((["mamba2", "attn"] * mc.n_layer)[: mc.n_layer]) if backbone == "hybrid" else ""
    mc.__post_init__()
    torch.manual_seed(0)
    env = WorldModelEnv(model=LWM(mc).eval(), layout=run.layout, env_id=run.cfg.env.id)
    rollouts = []
    for _ in range(2):
        obs, _ = env.reset(seed=5)
        frames = [obs["image"].copy()]
        for a in (2, 0, 2, 1, 2):
            obs, reward, terminated, truncated, _ = env.step(a)
            assert env.observation_space.contains(obs)
            frames.append(obs["image"].copy())
            if terminated or truncated:
                break
        rollouts.append(np.stack(frames))
    np.testing.assert_array_equal(rollouts[0], rollouts[1])


def test_reset_is_deterministic_and_imagines_from_the_real_start(run):
    env = WorldModelEnv(run, render_mode="rgb_array")
    real = env.adapter.make()
    try:
        o1, info = env.reset(seed=3)
        raw, _ = real.reset(seed=3)
        assert np.array_equal(o1["image"], raw["image"]) and o1["direction"] == raw["direction"]
        assert o1["mission"] == raw["mission"] and info["real_seed"] == 3
        steps1 = [env.step(a) for a in (2, 1, 2)]
        o2, _ = env.reset(seed=3)
        steps2 = [env.step(a) for a in (2, 1, 2)]
        assert np.array_equal(o1["image"], o2["image"])
        for (a, ra, ta, ua, _), (b, rb, tb, ub, _) in zip(steps1, steps2):
            assert np.array_equal(a["image"], b["image"]) and a["direction"] == b["direction"]
            assert (ra, ta, ua) == (rb, tb, ub)
            assert a in env.observation_space
        frame = env.render()
        assert frame.dtype == np.uint8 and frame.ndim == 3 and frame.shape == (7 * 16, 7 * 16, 3)
        with pytest.raises(ValueError, match="invalid action"):
            env.step(7)
    finally:
        env.close()
        real.close()


def test_the_adapter_draws_minigrids_own_pov(run):
    """adapter.render(fields) is exactly what MiniGrid draws for the agent's point of view."""
    from worldloom.world.envs import make_adapter

    adapter = make_adapter(run.cfg.env.id)
    env = gym.make(run.cfg.env.id, agent_pov=True, render_mode="rgb_array")
    obs, _ = env.reset(seed=5)
    assert np.array_equal(adapter.render(adapter.observe(obs), tile_size=8), env.unwrapped.get_pov_render(8))
    env.close()
    with pytest.raises(ValueError, match="egocentric view"):
        adapter.render({"image": np.zeros((7, 5, 3), np.uint8), "direction": np.uint8(0)})


# ------------------------------------------------------------------ batched env


def test_batched_tokens_mode_equals_each_stream_alone(run, val_episodes):
    eps = val_episodes[:3]
    missions, first = _first(eps)
    missions[1] = " ".join(missions[1].split()[:-1])  # prefixes of different lengths: the batch is left-padded
    missions[2] = missions[2] + " " + missions[2].split()[-1]
    assert len({len(run.layout.prefix(m)) for m in missions}) == 3
    acts = np.array([[2, 0, 1], [2, 2, 2], [1, 2, 0]])
    together = BatchedWorldModelEnv(run.model, run.layout, "tokens")
    together.reset(missions, first)
    outs = [together.step(a) for a in acts]
    for b in range(3):
        alone = BatchedWorldModelEnv(run.model, run.layout, "tokens")
        alone.reset([missions[b]], {k: v[b : b + 1] for k, v in first.items()})
        for t, a in enumerate(acts):
            obs, rew, term, trunc = alone.step(a[b : b + 1])
            assert np.array_equal(obs["image"][0], outs[t][0]["image"][b])
            assert obs["direction"][0] == outs[t][0]["direction"][b]
            assert (rew[0], term[0], trunc[0]) == (outs[t][1][b], outs[t][2][b], outs[t][3][b])


def test_parallel_mode_gives_valid_observations(run, val_episodes):
    missions, first = _first(val_episodes[:4])
    sim = BatchedWorldModelEnv(run.model, run.layout, "parallel", greedy=False, seed=1, max_steps=3)
    sim.reset(missions, first)
    for t in range(3):
        obs, rew, term, trunc = sim.step(np.full(4, 2))
        assert obs["image"].shape == (4, 7, 7, 3) and obs["image"].dtype == np.uint8
        assert obs["direction"].shape == (4,) and obs["direction"].max() <= 3
        assert obs["image"][..., 0].max() <= 10 and obs["image"][..., 1].max() <= 5 and obs["image"][..., 2].max() <= 2
        assert rew.shape == (4,) and rew.dtype == np.float32 and ((rew >= 0) & (rew <= 1)).all()
        assert not (term & trunc).any()
    assert (trunc | term).all() and sim.done.all()  # the step limit truncates
    assert sim.runner.pos == run.layout.obs_len  # between steps: right after an observation


def test_parallel_mode_needs_a_frame_head(run):
    headless = copy.deepcopy(run.model)  # (a shallow copy would share the submodule dict)
    headless.frame = None
    with pytest.raises(ValueError, match="frame head"):
        BatchedWorldModelEnv(headless, run.layout, "parallel")
    with pytest.raises(ValueError, match="mode"):
        BatchedWorldModelEnv(run.model, run.layout, "dreams")


def test_sampling_is_seeded(run, val_episodes):
    missions, first = _first(val_episodes[:2])

    def roll(seed):
        sim = BatchedWorldModelEnv(run.model, run.layout, "tokens", greedy=False, seed=seed)
        sim.reset(missions, first)
        return [sim.step([2, 1])[0]["image"] for _ in range(2)]

    assert all(np.array_equal(a, b) for a, b in zip(roll(4), roll(4)))


@torch.no_grad()
def test_cached_imagination_equals_one_teacher_forced_forward(run, val_episodes):
    """Greedy token-by-token imagination through the cache = the constrained argmax of one full
    forward over the same tokens (reward, done and all 50 observation tokens)."""
    model, lay = run.model, run.layout
    for ep in val_episodes[:3]:
        missions, first = _first([ep])
        sim = BatchedWorldModelEnv(model, lay, "tokens")
        sim.reset(missions, first)
        action = int(ep.action[0])
        obs, rew, term, trunc = sim.step([action])
        fed = sim.runner.steps[0]  # o_0 a_0 r d o_1, as the cache saw them
        assert len(fed) == lay.step_len + lay.obs_len
        prefix = lay.prefix(ep.mission)
        ids = np.concatenate([prefix, fed])
        slots = np.concatenate([np.zeros(len(prefix), np.int64), np.tile(lay.step_slots, 2)[: len(fed)]])
        skip = lay.skip_ids(ids, len(prefix))
        h = model(torch.from_numpy(ids)[None], None, torch.from_numpy(slots)[None], torch.from_numpy(skip)[None]).hidden
        logits = model.head(model.norm(h))[0].float()
        P = len(prefix)
        pred = []
        for j in range(P + lay.obs_len, len(ids) - 1):  # predicts ids[j+1]: r, d, o_1
            lo, hi = lay.step_ranges[(j + 1 - P) % lay.step_len]
            pred.append(lo + int(logits[j, lo:hi].argmax()))
        assert pred == ids[P + lay.obs_len + 1 :].tolist()
        fields = lay.decode_obs(np.array(pred[2:])[None])
        assert np.array_equal(fields["image"][0], obs["image"][0]) and fields["direction"][0] == obs["direction"][0]
        assert fed[lay.obs_len] == lay.action_ids(action) and PAD not in fed


@torch.no_grad()
def test_after_a_context_rebuild_imagination_equals_a_forward_of_the_kept_window(run, val_episodes):
    """When the stream outgrows the context the runner re-prefills the prefix and the latest steps;
    the next step's predictions then equal the constrained argmax of one forward of that window."""
    model, lay = run.model, run.layout
    ep = val_episodes[0]
    missions, first = _first([ep])
    sim = BatchedWorldModelEnv(model, lay, "tokens")
    sim.reset(missions, first)
    prefix = lay.prefix(ep.mission)
    steps = 0
    while sim.runner.rebuilds == 0:
        sim.step([steps % 3])
        steps += 1
    assert steps < 10
    sim.step([2])  # entirely after the rebuild (the window is far from full again)
    assert sim.runner.rebuilds == 1 and sim.runner.pos == lay.obs_len
    window = sim.runner.steps[0]
    assert len(window) % lay.step_len == lay.obs_len
    ids = np.concatenate([prefix, window])
    slots = np.concatenate([np.zeros(len(prefix), np.int64), np.tile(lay.step_slots, len(window) // lay.step_len + 1)[: len(window)]])
    skip = lay.skip_ids(ids, len(prefix))
    h = model(torch.from_numpy(ids)[None], None, torch.from_numpy(slots)[None], torch.from_numpy(skip)[None]).hidden
    logits = model.head(model.norm(h))[0].float()
    n = len(ids)
    for j in range(n - lay.obs_len - 2, n - 1):  # the last step's r, d and o tokens
        lo, hi = lay.step_ranges[(j + 1 - len(prefix)) % lay.step_len]
        assert lo + int(logits[j, lo:hi].argmax()) == ids[j + 1]


# ------------------------------------------------------------------ evaluation and pictures


def test_open_loop_accuracy(run, val_episodes):
    eps = val_episodes[:6]
    res = open_loop_accuracy(run.model, run.layout, eps, horizons=(1, 3, 8), batch=4)
    lengths = np.array([ep.length for ep in eps])
    assert set(res["horizons"]) == {"1", "3", "8"}
    for k, v in res["horizons"].items():
        assert v["n"] == int((lengths >= int(k)).sum())
        for name in ("frame", "cell", "direction"):
            assert v[name] is None if v["n"] == 0 else 0.0 <= v[name] <= 1.0
        if v["n"]:
            assert v["frame"] <= v["direction"] and v["frame"] <= v["cell"]
    assert res["curve"]["k"] == list(range(1, 9)) and len(res["curve"]["frame"]) == 8
    assert res["curve"]["n"] == [int((lengths >= k).sum()) for k in range(1, 9)]
    # one step open-loop from the real o_0 is the teacher-forced one-step frame: same in batches of 1
    one = open_loop_accuracy(run.model, run.layout, eps, horizons=(1,), batch=1)
    assert one["horizons"]["1"] == res["horizons"]["1"]
    par = open_loop_accuracy(run.model, run.layout, eps[:2], horizons=(2,), mode="parallel")
    assert par["mode"] == "parallel" and par["horizons"]["2"]["n"] == int((lengths[:2] >= 2).sum())
    # known-only frames: nothing new anywhere = every frame; the 2nd step of episode 0 reveals something
    # = episode 0 leaves the count from k = 2 on; an episode the adapter cannot tell (None) is never counted
    novel = [np.zeros(ep.length, np.int64) for ep in eps]
    clean = open_loop_accuracy(run.model, run.layout, eps, horizons=(1, 3, 8), batch=4, novel=novel)
    for k, v in clean["horizons"].items():
        assert v["n_known"] == v["n"] and v["frame_known"] == v["frame"]
    novel[0][1] = 2
    novel[1] = None
    some = open_loop_accuracy(run.model, run.layout, eps, horizons=(1, 3, 8), batch=4, novel=novel)
    for k, v in some["horizons"].items():
        k = int(k)
        assert v["n_known"] == sum(1 for i, L in enumerate(lengths) if L >= k and i != 1 and not (i == 0 and k >= 2))


def test_rollout_gif(run, tmp_path):
    frames = imagined_vs_real(run, None, seed=2, steps=4)
    assert 2 <= len(frames) <= 5 and frames[0].action is None and frames[0].exact
    for f in frames:
        assert f.real.shape == f.imagined.shape == (112, 112, 3) and f.real.dtype == np.uint8
    path = tmp_path / "gifs" / "rollout.gif"
    write_rollout_gif(frames, path, fps=3)
    with Image.open(path) as im:
        assert im.format == "GIF" and getattr(im, "n_frames", 1) == len(frames)
        old = (112 * 2 + 4, 112 + 14)  # the GIF frame before issue 12: views at 16-pixel tiles, a caption band
        assert im.size[0] >= 4 * old[0] and im.size[1] >= 4 * old[1] and im.info.get("loop") == 0
        assert im.size == (4 * (112 * 2 + 4), 4 * (14 + 112 + 14))  # labels above, caption below, all x4
        im.seek(len(frames) - 1)
        last = np.asarray(im.convert("RGB"))
    # the views are enlarged by nearest neighbour: each source pixel is a 4x4 block of the GIF frame
    real = frames[-1].real
    np.testing.assert_array_equal(last[56 : 56 + 448 : 4, 0:448:4], real)
    assert (last[56 : 56 + 448, 0:448] == real.repeat(4, 0).repeat(4, 1)).all()
    assert not [p for p in path.parent.iterdir() if p.name != "rollout.gif"]  # no temp files left
    # plain (real, imagined, action) tuples work too
    write_rollout_gif([(f.real, f.imagined, f.action) for f in frames], tmp_path / "plain.gif")
    with Image.open(tmp_path / "plain.gif") as im:
        assert im.n_frames == len(frames)
    write_rollout_gif(frames[:1], tmp_path / "small.gif", scale=1)
    with Image.open(tmp_path / "small.gif") as im:
        assert im.size == (112 * 2 + 4, 14 + 112 + 14)
    for bad in (0, 2.5):
        with pytest.raises(ValueError, match="scale"):
            write_rollout_gif(frames, tmp_path / "bad.gif", scale=bad)


def test_throughput(run, val_episodes):
    missions, first = _first(val_episodes[:2])
    for mode in ("tokens", "parallel"):
        assert imagination_throughput(run.model, run.layout, first, missions, batch=3, steps=2, mode=mode) > 0
