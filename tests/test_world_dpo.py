"""Trajectory DPO of a world run: pairs by outcome, episode log-probabilities, the DPO steps, the CLI."""

import json
import math

import numpy as np
import pytest
import torch

from worldloom.cli import main
from worldloom.run import load_run
from worldloom.world import dpo as wdpo
from worldloom.world import rl as wrl
from worldloom.world.data.episodes import load_dataset
from worldloom.world.rollout.agent import EpisodeResult


def R(seed, success, length):
    return EpisodeResult(seed, success, 1.0 if success else 0.0, length)


def test_pairs_prefer_short_successes_to_failures_then_to_long_successes():
    res = [R(1, True, 9), R(1, False, 64), R(1, True, 5),  # seed 1: shortest success vs a failure
           R(2, True, 4), R(2, True, 10),                  # seed 2: short vs a longer success
           R(3, True, 4), R(3, True, 5),                   # seed 3: gap 1 < min_gap: no pair
           R(4, False, 64), R(4, False, 64)]               # seed 4: never solved: no pair
    assert wdpo.pair_episodes(res, min_gap=2) == [(2, 1), (3, 4)]
    assert wdpo.pair_episodes(res, min_gap=1) == [(2, 1), (3, 4), (5, 6)]


@pytest.fixture(scope="module")
def played(world_run, world_dataset):
    run = load_run(world_run)
    eps = load_dataset(world_dataset).episodes("train")[:6]
    return run, [EpisodeResult(e.seed, i % 2 == 0, 1.0, e.length, e) for i, e in enumerate(eps)]


def test_episode_log_probs_are_the_sums_the_ppo_scorer_gives(played):
    run, res = played
    scorer = wdpo.Scorer(run.model, run.layout, res)
    with torch.no_grad():
        lp, _ = scorer.logp([0, 3, 5], wm=False)
        ro = wrl.build_rollout(run.layout, res, run.model.cfg.context)
        per_step = wrl.score(run.model, run.model, wrl.ValueHead(run.model.cfg.d_model), run.layout, ro, wrl.RLConfig()).old_logp
    want = [float(per_step[torch.from_numpy(ro.episode_of == e)].sum()) for e in (0, 3, 5)]
    assert np.allclose(lp.numpy(), want, atol=1e-3)


def test_dpo_steps_start_at_log2_and_raise_the_chosen_episodes(played):
    run, res = played
    model = run.model
    start = {k: v.clone() for k, v in model.state_dict().items()}
    scorer = wdpo.Scorer(model, run.layout, res)
    cfg = wdpo.TrajDPOConfig(epochs=6, batch=3, lr=3e-3, beta=0.5, wm_coef=0.0, sft_coef=0.0)
    rows = wdpo.train_pairs(scorer, [(0, 1), (2, 3), (4, 5)], cfg, progress=False, log=lambda *a: None)
    assert rows[0]["loss"] == pytest.approx(math.log(2), abs=1e-4)
    assert rows[-1]["loss"] < rows[0]["loss"] - 0.05 and rows[-1]["reward_acc"] == 1.0
    model.load_state_dict(start)


def test_cli_writes_a_world_run_and_the_comparison(world_run, tmp_path, monkeypatch):
    monkeypatch.setattr(wdpo, "pair_episodes", lambda res, gap: [(i, i + 1) for i in range(0, len(res) - 1, 2)])
    argv = ["tune", "dpo", str(world_run), "wdpo.seeds=2", "wdpo.samples=2", "wdpo.envs=4", "wdpo.eval_episodes=3",
            "wdpo.epochs=1", f"out_dir={tmp_path}", "name=wd", "--no-progress"]
    assert main(argv) == 0
    out = json.loads((tmp_path / "wd" / "dpo_eval.json").read_text())
    assert out["pairs"] == 2 and set(out["plain"]) == {"sampled", "greedy"} and set(out["aligned"]) == {"sampled", "greedy"}
    assert load_run(tmp_path / "wd").is_world


@pytest.mark.parametrize("args, needle", [(["wdpo.samples=1"], "wdpo.samples"), (["lora.rank=2"], "wdpo.<key>"),
                                          (["wdpo.sedes=3"], "did you mean")])
def test_cli_errors_are_one_line(world_run, tmp_path, capsys, args, needle):
    assert main(["tune", "dpo", str(world_run), *args, f"out_dir={tmp_path}"]) == 2
    err = capsys.readouterr().err.strip()
    assert needle in err and "\n" not in err


def test_rpo_term_keeps_the_chosen_episodes_likely(played):
    run, res = played
    model = run.model
    start = {k: v.clone() for k, v in model.state_dict().items()}
    scorer = wdpo.Scorer(model, run.layout, res)
    pairs = [(0, 1), (2, 3), (4, 5)]
    with torch.no_grad():
        before = scorer.logp([0, 2, 4], wm=False)[0]
    cfg = wdpo.TrajDPOConfig(epochs=4, batch=3, lr=3e-3, beta=0.5, wm_coef=0.0, sft_coef=1.0)
    wdpo.train_pairs(scorer, pairs, cfg, progress=False, log=lambda *a: None)
    with torch.no_grad():
        after = scorer.logp([0, 2, 4], wm=False)[0]
    model.load_state_dict(start)
    assert (after > before).all()
