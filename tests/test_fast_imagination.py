"""Lossless fast imagination (worldloom.world.rollout.fast): frame-head drafts verified token by token
give exactly the token-by-token imagination, in fewer forwards where the drafts are right."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

from worldloom.cli import main
from worldloom.config import build_config
from worldloom.model import LWM
from worldloom.world.data.episodes import load_dataset
from worldloom.world.rollout.fast import ImagineStats, Pace, imagine_frame
from worldloom.world.rollout.imagine import (
    BatchedWorldModelEnv,
    WorldModelEnv,
    imagination_throughput,
    imagined_vs_real,
    open_loop_accuracy,
)
from worldloom.world.rollout.plan import ImaginationPlanner

from conftest import TINY_WORLD


@pytest.fixture(scope="module")
def run(world_run):
    from worldloom.run import load_world_run

    return load_world_run(world_run)


@pytest.fixture(scope="module")
def trained(tmp_path_factory, world_dataset):
    """trained(backbone): a tiny world model with a frame head, trained for 30 steps (once per module)."""
    from worldloom.run import load_world_run
    from worldloom.train import train

    runs = {}

    def get(backbone: str):
        if backbone not in runs:
            out = tmp_path_factory.mktemp(f"{backbone}world")
            cfg = build_config(None, [*TINY_WORLD, f"data.path={world_dataset}", f"out_dir={out}", f"name={backbone}",
                                      "stream.parallel_obs=true", f"model.backbone={backbone}", "train.max_steps=30",
                                      "train.eval_interval=30", "train.lr=0.005"])
            train(cfg, progress=False, log=lambda *a: None)
            runs[backbone] = load_world_run(cfg.run_dir)
        return runs[backbone]

    return get


@pytest.fixture(scope="module")
def val_episodes(world_dataset):
    return load_dataset(world_dataset).episodes("val")


def _start(episodes, batch):
    """Missions and first observations of `batch` streams (different episodes: the rows diverge)."""
    eps = [episodes[i % len(episodes)] for i in range(batch)]
    return [e.mission for e in eps], {k: np.stack([e.obs[k][0] for e in eps]) for k in eps[0].obs}


def _imagine(model, layout, mode, missions, first, actions, **kw):
    """Every step's outputs and the whole fed stream of a BatchedWorldModelEnv under given actions
    (fast: every frame drafted, unless ``pace`` is given)."""
    sim = BatchedWorldModelEnv(model, layout, mode, **{"pace": False, **kw})
    sim.reset(missions, first)
    outs = []
    for a in actions:
        obs, reward, term, trunc = sim.step(a)
        outs.append((obs["image"].copy(), obs["direction"].copy(), reward, term, trunc))
    return outs, sim


def _assert_same(a, b):
    assert len(a) == len(b)
    for x, y in zip(a, b):
        for u, v in zip(x, y):
            np.testing.assert_array_equal(u, v)


def _model_like(run, backbone: str, context: int | None = None, seed: int = 0):
    """An untrained model of `run`'s shape (frame head included) with another backbone or context."""
    mc = copy.deepcopy(run.cfg.model)
    mc.backbone = backbone
    mc.layers = ",".join((["mamba2", "attn"] * mc.n_layer)[: mc.n_layer]) if backbone == "hybrid" else ""
    if context is not None:
        mc.context = context
    mc.__post_init__()
    torch.manual_seed(seed)
    return LWM(mc).eval()


@pytest.mark.parametrize("backbone", ["transformer", "mamba"])
def test_fast_is_exactly_tokens_for_diverging_rows(backbone, trained, val_episodes, monkeypatch):
    """Trained transformer and Mamba world models, 4 rows from different episodes under different
    actions, past a roll-over: the same frames, rewards and ends, and the same fed stream, while
    the rows accept different numbers of drafts in the same verification."""
    import worldloom.world.rollout.fast as fast_mod

    r = trained(backbone)
    missions, first = _start(val_episodes, 4)
    actions = np.random.default_rng(1).integers(r.layout.n_actions, size=(6, 4))
    tok, tsim = _imagine(r.model, r.layout, "tokens", missions, first, actions)
    counts = []

    def spy(*args, **kw):
        n, fix = fast_mod.verify_accept(*args, **kw)
        counts.append(n.clone())
        return n, fix

    monkeypatch.setattr(fast_mod, "verify_accept", fast_mod.accept, raising=False)
    monkeypatch.setattr(fast_mod, "accept", spy)
    fast, fsim = _imagine(r.model, r.layout, "fast", missions, first, actions)
    _assert_same(tok, fast)
    np.testing.assert_array_equal(tsim.runner.steps, fsim.runner.steps)
    assert fsim.runner.rebuilds == tsim.runner.rebuilds > 0  # past the context, at the same moments
    assert any(int(n.min()) != int(n.max()) for n in counts)  # rows accepted different lengths
    st = fsim.stats
    assert st.steps == 6 and st.frame_passes == 6 and 0 < st.accepted < st.drafted  # drafts stood and fell
    assert tsim.stats.forwards_per_step == r.layout.step_len


@pytest.mark.parametrize("backbone", ["retnet", "hybrid", "mamba2"])
def test_fast_is_exactly_tokens_for_other_backbones(backbone, run, val_episodes):
    """Untrained models (random heads: most drafts rejected) of the other recurrent backbones."""
    model = _model_like(run, backbone)
    missions, first = _start(val_episodes, 3)
    actions = np.random.default_rng(2).integers(run.layout.n_actions, size=(3, 3))
    tok, _ = _imagine(model, run.layout, "tokens", missions, first, actions)
    fast, fsim = _imagine(model, run.layout, "fast", missions, first, actions)
    _assert_same(tok, fast)
    assert fsim.stats.drafted > fsim.stats.accepted


@pytest.mark.parametrize("backbone", ["transformer", "mamba"])
@pytest.mark.parametrize("at", [0, 1, 25, 49, 51])
def test_roll_over_anywhere_in_a_step_stays_exact(backbone, at, run, val_episodes):
    """Contexts chosen so that the first roll-over falls on observation position `at` (0: the token
    the verification starts from; 49: the last; 51: the reward): still the tokens result."""
    missions, first = _start(val_episodes, 2)
    P = max(len(run.layout.prefix(m)) for m in missions)
    context = P + 2 * run.layout.step_len + at  # the id fed at steps index 2*step_len + at overflows
    model = _model_like(run, backbone, context)
    actions = np.random.default_rng(3).integers(run.layout.n_actions, size=(5, 2))
    tok, tsim = _imagine(model, run.layout, "tokens", missions, first, actions)
    fast, fsim = _imagine(model, run.layout, "fast", missions, first, actions)
    _assert_same(tok, fast)
    assert fsim.runner.rebuilds == tsim.runner.rebuilds >= 2


class _Oracle:
    """A frame head that drafts the token-by-token frames (recorded), optionally wrong at `wrong`."""

    def __init__(self, runner, frames, wrong=None):
        self.runner, self.frames, self.wrong, self.t = runner, frames, wrong, 0

    def __call__(self, h):
        ids = torch.from_numpy(self.frames[self.t]).clone()  # (B, obs_len)
        self.t += 1
        if self.wrong is not None:
            lo, hi = self.runner.layout.step_ranges[self.wrong]
            ids[:, self.wrong] = lo + (ids[:, self.wrong] - lo + 1) % (hi - lo)  # another allowed id
        logits = torch.full((*ids.shape, self.runner.layout.vocab_size), -1e4)
        return logits.scatter_(-1, ids[..., None], 0.0)


@pytest.mark.parametrize("wrong,per_step", [(None, 4), (20, 5)])
def test_right_drafts_cost_one_forward_per_frame(wrong, per_step, run, val_episodes):
    """A head that drafts the model's own frames: a, r, d and ONE verification per step (4 forwards
    instead of 53); one wrong draft per frame costs one more (the head's drafts after it stand)."""
    missions, first = _start(val_episodes, 3)
    actions = np.random.default_rng(4).integers(run.layout.n_actions, size=(3, 3))  # no roll-over yet
    tok, tsim = _imagine(run.model, run.layout, "tokens", missions, first, actions)
    L = run.layout.obs_len
    frames = [tsim.runner.steps[:, L + 3 + t * (L + 3): L + 3 + t * (L + 3) + L] for t in range(3)]
    sim = BatchedWorldModelEnv(run.model, run.layout, "fast", redraft="head", pace=False)
    sim.runner.frame = _Oracle(sim.runner, frames, wrong)
    sim.reset(missions, first)
    fast = []
    for a in actions:
        obs, reward, term, trunc = sim.step(a)
        fast.append((obs["image"].copy(), obs["direction"].copy(), reward, term, trunc))
    _assert_same(tok, fast)
    assert sim.runner.rebuilds == 0 and sim.stats.forwards_per_step == per_step
    if wrong is None:
        assert sim.stats.verifications == 3 and sim.stats.accepted == sim.stats.drafted == 3 * 3 * (L - 1)
    else:  # positions 1..19 stand, 20 is corrected, then 21..49 stand in a second verification
        assert sim.stats.verifications == 6 and sim.stats.accepted == 3 * 3 * (19 + L - 21)


def test_sampling_keeps_the_token_by_token_distribution(run, val_episodes):
    """greedy=False: speculative sampling with the frame head's distribution as the draft's. Over N
    draws of one imagined frame, every position's distribution matches token-by-token sampling's
    within a tolerance that the head's own frames (drafts taken as they come) miss by far."""
    model = copy.deepcopy(run.model)
    with torch.no_grad():
        model.norm.weight.mul_(30.0)  # sharper distributions (the model's and the head's): less sampling noise
    N = 1000
    missions, first = _start(val_episodes[:1], N)
    action = np.full((1, N), 2)
    L = run.layout.obs_len
    frames = {}
    for mode, seed in (("tokens", 0), ("fast", 1), ("parallel", 2)):
        sim = BatchedWorldModelEnv(model, run.layout, mode, greedy=False, seed=seed, pace=False)
        sim.reset(missions, first)
        sim.step(action[0])
        frames[mode] = sim.runner.steps[:, -L:]
        if mode == "fast":
            assert 0 < sim.stats.accepted < sim.stats.drafted  # both rules at work: acceptance and residual draws

    def gap(a, b):  # mean over positions of the total variation between the two empirical distributions
        V = run.layout.vocab_size
        return np.mean([0.5 * np.abs(np.bincount(a[:, i], minlength=V) - np.bincount(b[:, i], minlength=V)).sum() / N
                        for i in range(L)])

    assert gap(frames["tokens"], frames["fast"]) < 0.08  # two seeds of tokens mode differ by ~0.06
    assert gap(frames["tokens"], frames["parallel"]) > 0.3


def test_a_model_without_a_frame_head_is_refused(run, val_episodes, monkeypatch, capsys, tmp_path, world_run):
    headless = copy.deepcopy(run.model)
    headless.frame = None
    with pytest.raises(ValueError, match="frame head"):
        BatchedWorldModelEnv(headless, run.layout, "fast")
    with pytest.raises(ValueError, match="frame head"):
        WorldModelEnv(model=headless, layout=run.layout, env_id=run.cfg.env.id, mode="fast")
    from worldloom.world.rollout.runner import StreamRunner

    missions, first = _start(val_episodes, 1)
    runner = StreamRunner(headless, run.layout)
    h = runner.reset([run.layout.prefix(m) for m in missions], run.layout.encode_obs(first))  # right after o_0
    with pytest.raises(ValueError, match="frame head"):
        ImaginationPlanner(mode="fast").imagine(runner, h)

    import worldloom.run

    headless_run = copy.copy(run)
    headless_run.model = headless
    monkeypatch.setattr(worldloom.run, "load_world_run", lambda path, *a, **k: headless_run)
    rc = main(["imagine", str(world_run), "--fast", "--steps", "2", "--out", str(tmp_path / "x.gif")])
    err = capsys.readouterr().err
    assert rc == 2 and err.count("\n") == 1 and "frame head" in err and "Traceback" not in err


def test_planner_fast_imagines_what_tokens_imagines(run, val_episodes):
    """The planner's imagined rewards, ends and actions are the token-by-token ones."""
    from worldloom.world.rollout.runner import StreamRunner

    missions, first = _start(val_episodes, 2)
    got = {}
    for mode in ("tokens", "fast"):
        runner = StreamRunner(run.model, run.layout)
        h = runner.reset([run.layout.prefix(m) for m in missions], run.layout.encode_obs(first))
        planner = ImaginationPlanner(horizon=3, mode=mode)
        got[mode] = planner.imagine(runner, h)
        assert planner.stats.steps == 3 and planner.stats.forwards > 0
    for field in ("rewards", "ends", "actions"):
        np.testing.assert_array_equal(getattr(got["tokens"], field), getattr(got["fast"], field))
    assert planner.stats.drafted > 0


def test_open_loop_throughput_and_the_gif_rollout_take_fast(run, val_episodes, capsys, world_run, tmp_path):
    eps = val_episodes[:4]
    tok = open_loop_accuracy(run.model, run.layout, eps, horizons=(1, 3), batch=3)
    fast = open_loop_accuracy(run.model, run.layout, eps, horizons=(1, 3), batch=3, mode="fast")
    assert fast["mode"] == "fast" and fast["horizons"] == tok["horizons"]
    missions, first = _start(eps, 2)
    stats = ImagineStats()
    assert imagination_throughput(run.model, run.layout, first, missions, batch=2, steps=2, mode="fast", stats=stats) > 0
    assert stats.steps == 2 and stats.frame_passes >= 1 and stats.frame_passes + stats.token_frames == 2  # paced
    assert 0 < stats.forwards_per_step
    frames_tok = imagined_vs_real(run, seed=3, steps=3)
    frames_fast = imagined_vs_real(run, seed=3, steps=3, mode="fast")
    for a, b in zip(frames_tok, frames_fast):
        np.testing.assert_array_equal(a.imagined, b.imagined)
    envs = [WorldModelEnv(run, mode=mode) for mode in ("tokens", "fast")]
    for env in envs:
        env.reset(seed=5)
    for a in (2, 1, 2, 0):
        (o1, *rest1), (o2, *rest2) = (env.step(a) for env in envs)
        np.testing.assert_array_equal(o1["image"], o2["image"])
        assert o1["direction"] == o2["direction"] and rest1 == rest2
    assert envs[1]._sim.stats.frame_passes >= 1 and envs[1]._sim.stats.frame_passes + envs[1]._sim.stats.token_frames == 4
    rc = main(["imagine", str(world_run), "--seed", "3", "--steps", "3", "--fast", "--out", str(tmp_path / "f.gif")])
    out = capsys.readouterr().out
    assert rc == 0 and "forwards per imagined step" in out and "drafts accepted" in out


def test_imagine_frame_refuses_an_unknown_redraft(run, val_episodes):
    missions, first = _start(val_episodes, 1)
    sim = BatchedWorldModelEnv(run.model, run.layout, "fast")
    sim.reset(missions, first)
    with pytest.raises(ValueError, match="redraft"):
        imagine_frame(sim.runner, sim.h, redraft="guess")


def test_pace_drafts_only_where_drafting_is_faster():
    pace = Pace(retry=3)
    assert pace.drafts(64, 53)  # nothing timed yet: draft (and time it)
    pace.tokens(64, 0.03, 3)  # a one-token step: 10 ms; 53 of them: 0.53 s
    pace.drafted(64, 0.2)
    assert pace.drafts(64, 53) and pace.drafts(64, 53)  # a drafted frame is faster
    pace.drafted(64, 1.5)  # now slower than 53 steps
    assert [pace.drafts(64, 53) for _ in range(6)] == [False, False, True, False, False, True]  # retried every 3rd
    assert pace.drafts(1, 53)  # another batch size is timed apart
    with pytest.raises(ValueError, match="retry"):
        Pace(retry=0)


def test_a_paced_frame_taken_token_by_token_is_the_same_frame(run, val_episodes):
    missions, first = _start(val_episodes, 3)
    actions = np.random.default_rng(4).integers(run.layout.n_actions, size=(3, 3))
    tok, _ = _imagine(run.model, run.layout, "tokens", missions, first, actions)
    sim = BatchedWorldModelEnv(run.model, run.layout, "fast")
    sim.pace.retry = 3
    sim.pace.drafted(3, 1e9)  # as if a drafted frame had taken forever at batch 3
    sim.reset(missions, first)
    fast = []
    for a in actions:
        obs, reward, term, trunc = sim.step(a)
        fast.append((obs["image"].copy(), obs["direction"].copy(), reward, term, trunc))
    _assert_same(tok, fast)
    assert sim.stats.token_frames == 2 and sim.stats.frame_passes == 1  # two frames token by token, then a retry
    assert BatchedWorldModelEnv(run.model, run.layout, "fast", pace=False).pace is None
    assert BatchedWorldModelEnv(run.model, run.layout, "tokens").pace is None
