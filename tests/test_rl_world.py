"""PPO fine-tuning of a world run in the real environment (worldloom.world.rl, `worldloom tune ppo`)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from worldloom.cli import main
from worldloom.io import load_tensors
from worldloom.run import load_run
from worldloom.world import rl as wrl
from worldloom.world.data.collect import split_seed
from worldloom.world.data.episodes import load_dataset
from worldloom.world.rollout.agent import EpisodeResult
from worldloom.world.rollout.runner import StreamRunner

TINY_RL = ["rl.updates=2", "rl.envs=3", "rl.episodes=3", "rl.epochs=2", "rl.minibatch=40", "rl.value_warmup=1",
           "rl.target_kl=0", "rl.seed=5"]


def tune_cli(*args: str) -> int:
    return main(["tune", "ppo", *args, "--no-progress"])


def rows(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def final_state(run_dir: Path) -> dict[str, torch.Tensor]:
    run = load_run(run_dir)
    return {**run.model.state_dict(), **{f"value.{k}": v for k, v in load_tensors(run.checkpoint / "value.safetensors").items()}}


@pytest.fixture(scope="module")
def tuned(world_run, tmp_path_factory) -> Path:
    """The tiny world run tuned for 2 updates, uninterrupted."""
    out = tmp_path_factory.mktemp("rl")
    assert tune_cli(str(world_run), *TINY_RL, f"out_dir={out}", "name=ppo") == 0
    return out / "ppo"


def test_tune_ppo_writes_metrics_and_a_loadable_run(tuned, world_run):
    got = rows(tuned)
    assert [r["update"] for r in got] == [1, 2]
    assert [r["episodes"] for r in got] == [3, 6]
    assert 0 < got[0]["env_steps"] < got[1]["env_steps"]
    assert [r["value_only"] for r in got] == [True, False]
    assert all(0.0 <= r["success"] <= 1.0 for r in got)
    assert got[0]["kl"] == 0.0  # the value warm-up leaves the policy equal to the reference: KL exactly 0
    run = load_run(tuned)  # what `worldloom eval` / `imagine` read
    assert run.state["step"] == 2 and run.is_world
    assert (run.checkpoint / "value.safetensors").is_file()
    src = load_run(world_run)
    changed = [k for k, v in run.model.state_dict().items() if not torch.equal(v, src.model.state_dict()[k])]
    assert changed, "the PPO update (update 2) should have moved the policy"
    ref = load_tensors(tuned / "reference.safetensors")
    assert all(torch.equal(ref[k], src.model.state_dict()[k]) for k in ref)  # the frozen starting model


@pytest.mark.parametrize("every", [1, 2])
def test_resumed_after_a_kill_continues_the_same_sequence(tuned, world_run, tmp_path, monkeypatch, every):
    """Killed while collecting update 2: from the checkpoint of update 1 (every=1) or of update 0 (every=2, whose
    metrics row of update 1 was written but not checkpointed: it is dropped and played again)."""
    real = wrl.run_episodes
    calls = []

    def dies_in_update_two(*a, **k):
        calls.append(1)
        if len(calls) == 2:
            raise RuntimeError("killed")
        return real(*a, **k)

    monkeypatch.setattr(wrl, "run_episodes", dies_in_update_two)
    with pytest.raises(RuntimeError, match="killed"):
        wrl.tune(world_run, [*TINY_RL, f"rl.checkpoint_every={every}", f"out_dir={tmp_path}", "name=ppo"],
                 progress=False, log=lambda *a: None)
    monkeypatch.setattr(wrl, "run_episodes", real)
    assert load_run(tmp_path / "ppo").state["step"] == (1 if every == 1 else 0)
    assert len(rows(tmp_path / "ppo")) == 1
    assert tune_cli("--resume", str(tmp_path / "ppo")) == 0
    a, b = final_state(tuned), final_state(tmp_path / "ppo")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    strip = lambda rs: [{k: v for k, v in r.items() if k != "elapsed"} for r in rs]  # noqa: E731
    assert strip(rows(tuned)) == strip(rows(tmp_path / "ppo"))


def test_scored_log_probs_match_the_runner_that_acted(world_run, world_dataset):
    """The stream windows reproduce what StreamRunner showed the policy, roll-over included."""
    run = load_run(world_run)
    lay, model = run.layout, run.model
    ep = max(load_dataset(world_dataset).episodes("train"), key=lambda e: e.length)
    tok = lay.episode(ep)
    assert len(wrl.windows(len(tok.prefix), tok.length, lay.step_len, model.cfg.context, lay.obs_len)) > 1, "need a rolled-over episode"
    ro = wrl.build_rollout(lay, [EpisodeResult(ep.seed, True, 1.0, ep.length, ep)], model.cfg.context)
    sc = wrl.score(model, model, wrl.ValueHead(model.cfg.d_model), lay, ro, wrl.RLConfig())
    runner = StreamRunner(model, lay)
    h = runner.reset([tok.prefix], tok.steps[:1, : lay.obs_len])
    lo = lay.offset["action"]
    want = []
    for t in range(tok.length):
        lp = torch.log_softmax(runner.logits(h)[0, lo : lo + lay.n_actions], -1)
        want.append(float(lp[ep.action[t]]))
        if t + 1 < tok.length:
            h = runner.feed(np.concatenate([tok.steps[t, lay.obs_len :], tok.steps[t + 1, : lay.obs_len]])[None])[:, -1]
    assert runner.rebuilds > 0
    assert np.allclose(sc.old_logp.numpy(), want, atol=1e-4)


def test_an_episode_cut_at_the_horizon_bootstraps_from_its_last_observation(world_run, world_dataset):
    """rl.horizon cuts: the return past the cut is the critic's value of o_T, read as the runner would read it
    had the game gone on; GAE carries it back by (gamma * lambda) per step. A level's own time limit is not
    bootstrapped (an episode of another length than the cut)."""
    import dataclasses
    run = load_run(world_run)
    lay, model = run.layout, run.model
    ep = max(load_dataset(world_dataset).episodes("train"), key=lambda e: e.length)
    ep = dataclasses.replace(ep, terminated=False, truncated=True)
    T, tok = ep.length, lay.episode(ep)
    res = [EpisodeResult(ep.seed, False, 0.0, T, ep)]
    torch.manual_seed(0)
    value_head = wrl.ValueHead(model.cfg.d_model)
    torch.nn.init.normal_(value_head.out.weight)  # a critic with an opinion (a fresh one says 0 everywhere)
    cfg = wrl.RLConfig(gamma=0.9, lam=0.8)
    plain = wrl.build_rollout(lay, res, model.cfg.context)
    cut = wrl.build_rollout(lay, res, model.cfg.context, cut=T)
    assert plain.tails == [] and len(cut.tails) == 1 and wrl.build_rollout(lay, res, model.cfg.context, cut=T + 1).tails == []
    runner = StreamRunner(model, lay)
    h = runner.reset([tok.prefix], tok.steps[:1, : lay.obs_len])
    for t in range(T):
        rest = tok.steps[t, lay.obs_len :].copy()
        if t == T - 1:
            rest[-1] = lay.done_ids(np.zeros(1, bool), np.zeros(1, bool))[0]  # "continue": the game goes on
        h = runner.feed(np.concatenate([rest, lay.encode_obs({k: v[t + 1 : t + 2] for k, v in ep.obs.items()})[0]])[None])[:, -1]
    with torch.no_grad():
        boot = float(value_head(h)[0])
        a = wrl.score(model, model, value_head, lay, plain, cfg).returns.numpy()
        b = wrl.score(model, model, value_head, lay, cut, cfg).returns.numpy()
    want = cfg.gamma * boot * (cfg.gamma * cfg.lam) ** np.arange(T)[::-1]
    assert abs(boot) > 1e-3 and np.allclose(b - a, want, atol=1e-4)


def test_rl_seeds_are_their_own_split():
    seeds = {split_seed(s, 0, i) for s in ("train", "val", "eval") for i in (0, 999_999)}
    assert not seeds & {split_seed("rl", 0, 0), split_seed("rl", 0, 999_999)}


@pytest.mark.parametrize("args, message", [
    (["rl.clipp=0.1"], "rl.clipp"),
    (["model.n_layer=2"], "tune ppo takes rl.<key>"),
    (["rl.envs=0"], "rl.envs must be >= 1"),
    (["train.threads=-1"], "train.threads must be between 0 (all cores)"),
    (["train.lr=0.1"], "tune ppo takes rl.<key>, train.threads, name and out_dir"),
])
def test_tune_config_errors_are_one_line(world_run, tmp_path, capsys, args, message):
    assert tune_cli(str(world_run), *args, f"out_dir={tmp_path}") == 2
    err = capsys.readouterr().err.strip()
    assert message in err and err.startswith("worldloom: error:") and len(err.splitlines()) == 1


def test_tune_refuses_to_overwrite_or_resume_the_wrong_folder(tuned, world_run, capsys):
    assert tune_cli(str(world_run), f"out_dir={tuned.parent}", "name=ppo") == 2
    assert "already holds a run" in capsys.readouterr().err
    assert tune_cli("--resume", str(world_run)) == 2  # a world run, not an RL run
    assert "not an RL run folder" in capsys.readouterr().err
    assert tune_cli("--resume", str(tuned), "name=other") == 2
    assert "fixed once a run exists" in capsys.readouterr().err


def test_threads_come_from_the_command_line_else_the_run(world_run, tuned):
    assert wrl.threads_of(world_run, ["rl.updates=1", "train.threads=1", "name=x"], allow_run_keys=True) == 1
    own = (load_run(world_run).cfg.train.threads)
    assert wrl.threads_of(world_run, ["rl.updates=1"], allow_run_keys=True) == own
    assert wrl.threads_of(tuned, ["train.threads=2"], allow_run_keys=False) == 2  # --resume takes it too
    assert wrl.parse_run_overrides(["rl.lr=0.1", "train.threads=3", "name=n"], True) == ({"lr": 0.1}, {"threads": 3, "name": "n"})


def test_world_model_loss_on_collected_transitions(world_run, tmp_path):
    assert wrl.RLConfig().wm_coef > 0  # on by default: one network, the world model must not drift
    wrl.tune(world_run, ["rl.updates=1", "rl.envs=2", "rl.episodes=2", "rl.epochs=1", "rl.value_warmup=0",
                         "rl.wm_coef=0.5", f"out_dir={tmp_path}", "name=wm"], progress=False, log=lambda *a: None)
    row = rows(tmp_path / "wm")[0]
    assert row["wm"] > 0 and not row["value_only"]


def test_update_seeds_replay_the_screened_failures_in_rotation():
    from types import SimpleNamespace

    cfg = wrl.RLConfig(envs=4, screen=10, replay=0.5)
    tu = SimpleNamespace(cfg=cfg, hard=[7, 8, 9], update=0, episodes=0, data_seed=0)
    fresh = lambda i: split_seed("rl", 0, i)  # noqa: E731
    assert wrl.update_seeds(tu) == ([7, 8, fresh(0), fresh(1)], 2)
    tu.update, tu.episodes = 1, 4
    assert wrl.update_seeds(tu) == ([9, 7, fresh(4), fresh(5)], 2)
    tu.hard = []  # the screen found nothing: every episode is fresh
    assert wrl.update_seeds(tu) == ([fresh(4 + i) for i in range(4)], 0)
    tu.hard, tu.cfg = [7], wrl.RLConfig(envs=2, screen=10, replay=0.9)
    assert wrl.update_seeds(tu)[1] == 1  # at least one fresh seed per update
    screened = {split_seed("rl", 0, wrl.SCREEN_BASE + i) for i in range(3)}
    assert not screened & {fresh(i) for i in range(wrl.SCREEN_BASE)}  # disjoint from the updates' seeds


def test_screen_replays_what_the_greedy_policy_failed_and_resumes(world_run, tmp_path, monkeypatch):
    from worldloom.config import read_yaml
    from worldloom.world.rollout.agent import run_episodes

    run = load_run(world_run)
    seeds = [split_seed("rl", 0, wrl.SCREEN_BASE + i) for i in range(6)]
    greedy = run_episodes(run.model, run.layout, run.cfg.env.id, seeds, envs=6, greedy=True)
    want = [r.seed for r in greedy if not r.success]
    assert 0 < len(want), "the tiny run should fail some seeds, or replay is not exercised"
    args = [*TINY_RL, "rl.screen=6", "rl.replay=0.67"]
    played = []
    real = wrl.collect
    monkeypatch.setattr(wrl, "collect", lambda tu, s, *a, **k: (played.append(list(s)), real(tu, s, *a, **k))[1])
    wrl.tune(world_run, [*args, f"out_dir={tmp_path}", "name=a"], progress=False, log=lambda *a: None)
    saved = read_yaml(tmp_path / "a" / "rl.yaml")["screened"]
    assert saved["failed"] == want and saved["env_steps"] == sum(r.length for r in greedy)
    got = rows(tmp_path / "a")
    k = 2
    assert [s[:k] for s in played] == [[want[(u * k + i) % len(want)] for i in range(k)] for u in range(2)]
    # the screen's real steps and resets are counted before update 1's (3 episodes)
    assert got[0]["env_steps"] == saved["env_steps"] + round(got[0]["length"] * 3)
    assert got[0]["real_steps"] == got[0]["env_steps"] + 6 + 3
    assert 0.0 <= got[0]["replayed_success"] <= 1.0
    # killed after update 1, resumed: the same sequence as the run never stopped
    monkeypatch.setattr(wrl, "collect", real)
    wrl.tune(world_run, [*args, "rl.updates=1", f"out_dir={tmp_path}", "name=b"], progress=False, log=lambda *a: None)
    assert tune_cli("--resume", str(tmp_path / "b"), "rl.updates=2") == 0
    a, b = final_state(tmp_path / "a"), final_state(tmp_path / "b")
    assert all(torch.equal(a[key], b[key]) for key in a)
    assert tune_cli("--resume", str(tmp_path / "b"), "rl.screen=8") == 2  # fixed when the run starts


def test_screen_is_refused_in_imagination(world_run, tmp_path, capsys):
    assert tune_cli(str(world_run), "rl.screen=10", "rl.world=imagined", f"out_dir={tmp_path}") == 2
    assert "rl.screen is for rl.world=real" in capsys.readouterr().err
