"""The world recipe: observation tokenizer, stream layout, batches, training, metrics and acting."""

from __future__ import annotations

import collections

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from worldloom.config import StreamConfig, build_config
from worldloom.tokenize import GridTokenizer, ScalarBins
from worldloom.world.data.packing import EpisodeData
from worldloom.world.stream import K_ACTION, K_OBS, StreamLayout

from conftest import TINY_WORLD


# ---------------------------------------------------------------- tokenizers


grid = GridTokenizer()


@given(st.integers(0, 2**32 - 1))
def test_grid_tokenizer_round_trip_any_cell(seed):
    rng = np.random.default_rng(seed)
    image = np.stack([rng.integers(0, grid.n_objects, (7, 7)), rng.integers(0, grid.n_colors, (7, 7)),
                      rng.integers(0, grid.n_states, (7, 7))], axis=-1).astype(np.uint8)
    obs = {"image": image, "direction": int(rng.integers(4))}
    ids = grid.encode(obs)
    assert ids.shape == (50,) and ids.min() >= 0 and ids.max() < grid.vocab_size
    back = grid.decode(ids)
    assert np.array_equal(back["image"], image) and back["direction"] == obs["direction"]


def test_grid_tokenizer_round_trips_real_observations(episodes):
    for ep in episodes[0][:10]:
        ids = grid.encode_batch(ep.obs)
        back = grid.decode_batch(ids)
        assert back.keys() == ep.obs.keys()
        for k in back:
            assert np.array_equal(back[k], ep.obs[k]) and back[k].dtype == ep.obs[k].dtype, k


def test_grid_tokenizer_rejects_cells_outside_the_codebook():
    bad = np.zeros((1, 7, 7, 3), np.uint8)
    bad[0, 0, 0, 0] = grid.n_objects
    with pytest.raises(ValueError, match="codebook"):
        grid.encode_batch({"image": bad, "direction": np.zeros(1)})


def test_grid_tokenizer_reads_the_far_row_first():
    image = np.zeros((1, 7, 7, 3), np.uint8)
    image[0, 3, 6] = (10, 0, 0)  # the agent's own cell [x=3, y=6] (object 10 = agent)
    ids = grid.encode_batch({"image": image, "direction": np.zeros(1)})
    assert ids[0, 6 * 7 + 3] == 10 * grid.n_colors * grid.n_states


def test_reward_bins():
    bins = ScalarBins(10)
    ids = bins.encode_batch([0.0, 0.05, 0.1, 0.11, 1.0, 1.5, -1])
    assert ids.tolist() == [0, 1, 1, 2, 10, 10, 0]
    assert np.allclose(bins.decode_batch(ids), [0, 0.05, 0.05, 0.15, 0.95, 0.95, 0])


# ---------------------------------------------------------------- stream layout


def test_layout_round_trips_an_episode(layout, episodes):
    ep = episodes[0][0]
    tok = layout.episode(ep)
    assert tok.steps.shape == (ep.length, layout.step_len)
    assert layout.mission.decode(tok.prefix[1:-1] - layout.offset["mission"]) == ep.mission
    fields = layout.decode_obs(tok.steps[:, : layout.obs_len])
    assert np.array_equal(fields["image"], ep.obs["image"][: ep.length])
    assert np.array_equal(fields["direction"], ep.obs["direction"][: ep.length])
    assert np.array_equal(layout.decode_action(tok.steps[:, layout.obs_len]), ep.action)
    term, trunc = layout.decode_done(tok.steps[:, -1])
    assert term[-1] == ep.terminated and not term[:-1].any() and not trunc.any()
    assert np.allclose(layout.decode_reward(tok.steps[:, -2]), ep.reward, atol=0.5 / layout.reward.n_bins)
    for pos in range(layout.step_len):  # every token sits in its position's vocabulary slice
        lo, hi = layout.step_ranges[pos]
        assert ((tok.steps[:, pos] >= lo) & (tok.steps[:, pos] < hi)).all()


def test_layout_slices_do_not_overlap(layout):
    spans = sorted((layout.offset[k], layout.offset[k] + layout.size[k]) for k in layout.offset)
    for (a0, a1), (b0, b1) in zip(spans, spans[1:]):
        assert a1 <= b0
    assert spans[-1][1] == layout.vocab_size


def test_layout_save_load(layout, tmp_path):
    layout.save(tmp_path / "stream")
    back = StreamLayout.load(tmp_path / "stream")
    assert back.vocab_size == layout.vocab_size and back.offset == layout.offset
    assert np.array_equal(back.prefix("go to the red ball"), layout.prefix("go to the red ball"))


# ---------------------------------------------------------------- batches


def test_batches_pack_rows_and_weight_targets_by_kind(layout, episodes):
    train = [layout.episode(e) for e in episodes[0]]
    cfg = StreamConfig(weight_obs=0.5, weight_action=2.0)
    data = EpisodeData(layout, train, train, cfg, frame_head=True)
    b = data.batch("train", 3, 255, torch.Generator().manual_seed(0))
    assert b["input"].shape == (3, 255) and torch.equal(b["input"][:, 1:], b["target"][:, :-1])
    w = b["weight"]
    assert set(w[b["part_obs"]].unique().tolist()) == {0.5}
    assert set(w[b["part_action"]].unique().tolist()) == {2.0}
    # the frame targets are the tokens that follow each done token
    flat_t = b["target"].flatten()
    for k, idx in enumerate(b["frame_index"].tolist()):
        assert torch.equal(b["frame_target"][k], flat_t[idx : idx + layout.obs_len])


def test_random_actions_are_not_policy_targets(layout, episodes):
    eps = [e for e in episodes[0] if e.random_action.any()]
    assert eps, "the fixture should hold perturbed episodes with random actions"
    ep = eps[0]
    data = EpisodeData(layout, [layout.episode(ep)], [layout.episode(ep)], StreamConfig())
    b = next(data.windows("train", 1024, 1))
    kinds = layout.kinds_of(b["target"][0].numpy())
    act_w = b["weight"][0].numpy()[kinds == K_ACTION]
    assert np.array_equal(act_w == 0, ep.random_action[: len(act_w)])
    obs_w = b["weight"][0].numpy()[kinds == K_OBS]
    assert (obs_w[:50] == 0).all() and (obs_w[50:] == 1).all()  # o_0 (a new level) is not a transition target


def test_context_too_small_for_one_step(layout, episodes):
    from worldloom.errors import DataError

    data = EpisodeData(layout, [layout.episode(e) for e in episodes[0]], [layout.episode(episodes[1][0])], StreamConfig())
    with pytest.raises(DataError, match="model.context"):
        data.check_context(32)


# ---------------------------------------------------------------- the trained tiny run


def test_world_run_learns(world_run):
    from worldloom.train.plots import read_metrics

    rows = [r for r in read_metrics(world_run / "metrics.jsonl") if "loss" in r]
    assert rows[-1]["loss"] < rows[0]["loss"]
    assert {"loss_obs", "loss_action", "loss_frame"} <= set(rows[0])


def test_teacher_forced_accuracy_is_consistent(world_run, episodes):
    from worldloom.run import load_world_run
    from worldloom.world.eval.metrics import episode_flags, teacher_forced_accuracy

    run = load_world_run(world_run)
    val = episodes[1]
    p, ar = episode_flags(val)
    acc = teacher_forced_accuracy(run.model, run.layout, [run.layout.episode(e) for e in val], p, ar, run.cfg.model.context)
    for group in ("expert", "perturbed"):
        g = acc[group]
        assert 0 <= g["frame"] <= g["token"] <= 1  # a right frame needs all its tokens right
        assert g["frame_n"] > 0 and g["token_n"] == 50 * g["frame_n"]
        assert 0 <= g["frame_parallel"] <= 1
    # the same frames again, by the action that led to each (a_{t-1} of o_t): counts and exact frames add up
    by = acc["by_action"]
    taken = collections.Counter()
    for e in val:
        m = min(e.length, (run.cfg.model.context + 1 - len(run.layout.episode(e).prefix)) // run.layout.step_len)
        taken.update(str(int(a)) for a in e.action[: m - 1])
    assert {k: v["frame_n"] for k, v in by.items()} == dict(taken)
    exact = sum(acc[g]["frame"] * acc[g]["frame_n"] for g in ("expert", "perturbed"))
    assert abs(sum(v["frame"] * v["frame_n"] for v in by.values()) - exact) < 1e-6


def test_novel_objects_counts_only_first_sightings(episodes):
    """Turning on the spot: the first full turn may reveal objects, the second (same four views) never does."""
    from worldloom.world.envs import make_adapter
    from worldloom.world.data.episodes import Episode

    adapter = make_adapter("BabyAI-GoToLocal-v0")
    env = adapter.make()
    found = 0
    for seed in range(6):
        obs, _ = env.reset(seed=seed)
        images, dirs = [obs["image"]], [obs["direction"]]
        for _ in range(8):  # left x 8
            obs, *_ = env.step(0)
            images.append(obs["image"])
            dirs.append(obs["direction"])
        ep = Episode(seed=seed, mission=obs["mission"], obs={"image": np.stack(images), "direction": np.array(dirs, np.uint8)},
                     action=np.zeros(8, np.int64), reward=np.zeros(8, np.float32), terminated=False, truncated=False,
                     random_action=np.zeros(8, bool))
        counts = adapter.novel_objects([ep])[0]
        assert counts is not None and counts.shape == (8,) and (counts >= 0).all()
        assert counts[3] == 0 and (counts[4:] == 0).all()  # back at the first view, then views seen before
        found += int(counts[:3].sum())
        ep.obs["image"][5, 3, 3, 0] = 7  # a box the environment never showed: the replay no longer matches
        assert adapter.novel_objects([ep])[0] is None
    env.close()
    assert found > 0  # a full turn in a room of 9 objects shows some object the first view did not


def test_frame_accuracy_splits_by_novelty(world_run, episodes):
    from worldloom.run import load_world_run
    from worldloom.world.envs import make_adapter
    from worldloom.world.eval.metrics import episode_flags, teacher_forced_accuracy

    run = load_world_run(world_run)
    val = episodes[1]
    p, ar = episode_flags(val)
    novel = make_adapter(run.cfg.env.id).novel_objects(val)
    assert all(n is not None and n.shape == (e.length,) for n, e in zip(novel, val))
    toks = [run.layout.episode(e) for e in val]
    acc = teacher_forced_accuracy(run.model, run.layout, toks, p, ar, run.cfg.model.context, novel=novel)
    everything_new = teacher_forced_accuracy(run.model, run.layout, toks, p, ar, run.cfg.model.context,
                                             novel=[np.ones_like(n) for n in novel])
    S, ctx = run.layout.step_len, run.cfg.model.context
    for group in ("expert", "perturbed"):
        g = acc[group]
        # o_t (t >= 1) of each episode's first window is scored; novel[t - 1] says whether it reveals something
        n_new = sum(int((n[: min(e.length, (ctx + 1 - len(tk.prefix)) // S) - 1] > 0).sum())
                    for n, e, tk in zip(novel, val, toks) if bool(e.perturbed) == (group == "perturbed"))
        assert g["novel_n"] == g["frame_n"] and round(g["novel"] * g["novel_n"]) == n_new  # o_1.. are scored
        assert g["frame_known_n"] == g["frame_n"] - n_new
        assert "frame_known" not in everything_new[group] and everything_new[group]["novel"] == 1.0
    assert sum(v.get("frame_known_n", 0) for v in acc["by_action"].values()) == sum(
        acc[g]["frame_known_n"] for g in ("expert", "perturbed"))


def test_agent_acts_in_the_real_env(world_run):
    from worldloom.run import load_world_run
    from worldloom.world.rollout.agent import run_episodes

    run = load_world_run(world_run)
    seeds = [2_000_000 + i for i in range(5)]
    res = run_episodes(run.model, run.layout, run.cfg.env.id, seeds, envs=2)
    assert [r.seed for r in res] == seeds
    for r in res:
        assert 1 <= r.length <= 64 and (r.ret > 0) == r.success
    again = run_episodes(run.model, run.layout, run.cfg.env.id, seeds, envs=5)  # batch size does not change greedy acting
    assert [(r.success, r.length) for r in again] == [(r.success, r.length) for r in res]


def test_runner_rolls_over_the_context(world_run):
    """Past the context the runner keeps the mission and the latest steps, and goes on."""
    from worldloom.run import load_world_run
    from worldloom.world.rollout.runner import StreamRunner

    run = load_world_run(world_run)
    lay = run.layout
    runner = StreamRunner(run.model, lay)
    obs = lay.encode_obs({"image": np.zeros((2, 7, 7, 3), np.uint8), "direction": np.zeros(2)})
    runner.reset([lay.prefix("go to the red ball"), lay.prefix("go to a key")], obs)
    for _ in range(8):  # 8 steps of 53 tokens > context 256
        h = runner.feed(np.concatenate([np.stack([lay.action_ids([2, 2]), lay.reward_ids([0, 0]), lay.done_ids([0, 0], [0, 0])], 1), obs], 1))
        assert h.shape[:2] == (2, lay.step_len)
    assert runner.rebuilds > 0 and runner.pos == lay.obs_len
    assert np.isfinite(runner.logits(h[:, -1]).max(-1).values.numpy()).all()


def test_world_config_errors():
    from worldloom.errors import ConfigError

    with pytest.raises(ConfigError, match="recipe"):
        build_config(None, ["recipe=dream"])
    with pytest.raises(ConfigError, match="data.perturbed"):
        build_config("babyai", ["data.perturbed=2"])
    with pytest.raises(ConfigError, match="did you mean 'env.id'"):
        build_config("babyai", ["env.idd=x"])
    assert build_config(None, TINY_WORLD).recipe == "world"


@pytest.mark.parametrize("backbone", ["transformer", "mamba", "mamba2", "retnet", "hybrid"])
def test_forked_runner_equals_a_fresh_prefill(layout, episodes, backbone):
    """fork() copies cache rows (KV and recurrent states); continuing a fork = continuing a runner
    prefilled from scratch with the same streams. Also proves every backbone drives the stream."""
    from worldloom.model import LWM
    from worldloom.world.rollout.runner import StreamRunner

    extra = ["model.backbone=hybrid", "model.n_layer=2", "model.layers=mamba,attn"] if backbone == "hybrid" else [f"model.backbone={backbone}"]
    cfg = build_config(None, [*TINY_WORLD, *extra]).model
    cfg.vocab_size, cfg.slots, cfg.period = layout.vocab_size, layout.n_slots, layout.step_len
    torch.manual_seed(0)
    model = LWM(cfg).eval()
    eps = episodes[1][:3]
    obs = layout.encode_obs({"image": np.stack([e.obs["image"][0] for e in eps]), "direction": np.stack([e.obs["direction"][0] for e in eps])})
    runner = StreamRunner(model, layout)
    runner.reset([layout.prefix(e.mission) for e in eps], obs)
    rows = np.array([2, 0, 0, 1])
    fork = runner.fork(rows)
    fresh = StreamRunner(model, layout)
    fresh.reset([layout.prefix(eps[r].mission) for r in rows], obs[rows])
    ids = np.stack([layout.action_ids(np.array([2, 1, 0, 2])), layout.reward_ids(np.zeros(4)), layout.done_ids(np.zeros(4), np.zeros(4))], 1)
    torch.testing.assert_close(fork.feed(ids), fresh.feed(ids), rtol=1e-4, atol=1e-4)
    assert runner.steps.shape[1] == layout.obs_len  # the original is untouched


def test_grid_positions_embed_row_and_column():
    """model.slot_grid: cells (slots 1..g*g, row-major) add a row and a column vector; other slots add nothing."""
    import torch

    from worldloom.config import ConfigError, ModelConfig
    from worldloom.model import LWM

    cfg = ModelConfig(vocab_size=20, n_layer=1, n_head=2, d_model=16, context=32, slots=12, slot_grid=3)
    model = LWM(cfg)
    assert model.slot_row.tolist() == [0, 1, 1, 1, 2, 2, 2, 3, 3, 3, 0, 0]
    assert model.slot_col.tolist() == [0, 4, 5, 6, 4, 5, 6, 4, 5, 6, 0, 0]
    ids = torch.tensor([[3, 4, 5, 6]])
    outside, row2 = torch.tensor([[1, 2, 10, 11]]), torch.tensor([[1, 5, 10, 11]])
    base = model(ids, slots=outside).hidden
    before = model(ids, slots=row2).hidden
    with torch.no_grad():
        model.grid_embed.weight[2].add_(1.0)  # row 2: slots 4..6 only
    same = model(ids, slots=outside).hidden
    after = model(ids, slots=row2).hidden
    assert torch.allclose(base, same)  # no slot of row 2 in the input: nothing changes
    assert torch.allclose(after[0, 0], before[0, 0])  # causal: the position before the row-2 cell is unchanged
    assert not torch.allclose(after[0, 1], before[0, 1])  # the row-2 cell (slot 5) reads its row vector
    with pytest.raises(ConfigError, match="slot_grid"):
        ModelConfig(vocab_size=20, slots=9, slot_grid=3)
