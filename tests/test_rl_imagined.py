"""PPO trained inside the learned world (`worldloom tune ppo RUN rl.world=imagined`): episodes imagined by
the world model from real starting observations (worldloom.world.rollout.imagined, worldloom.world.rl)."""

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
from worldloom.world.rollout import imagined
from worldloom.world.rollout.imagine import BatchedWorldModelEnv

TINY_IMAGINED = ["rl.world=imagined", "rl.updates=2", "rl.envs=3", "rl.episodes=3", "rl.epochs=2", "rl.minibatch=40",
                 "rl.value_warmup=1", "rl.target_kl=0", "rl.seed=5"]
QUIET = dict(progress=False, log=lambda *a: None)


def rows(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def final_state(run_dir: Path) -> dict[str, torch.Tensor]:
    run = load_run(run_dir)
    return {**run.model.state_dict(), **{f"value.{k}": v for k, v in load_tensors(run.checkpoint / "value.safetensors").items()}}


@pytest.fixture
def real_calls(monkeypatch) -> dict:
    """Counts every reset and step of the real environments that imagination creates."""
    calls = {"reset": 0, "step": 0}
    make_adapter = imagined.make_adapter

    def counting(env_id):
        adapter = make_adapter(env_id)
        make = adapter.make

        def counted_make(*a, **k):
            env = make(*a, **k)
            reset, step = env.reset, env.step
            env.reset = lambda *a, **k: (calls.__setitem__("reset", calls["reset"] + 1), reset(*a, **k))[1]
            env.step = lambda *a, **k: (calls.__setitem__("step", calls["step"] + 1), step(*a, **k))[1]
            return env

        adapter.make = counted_make
        return adapter

    monkeypatch.setattr(imagined, "make_adapter", counting)
    return calls


@pytest.fixture(scope="module")
def tuned(world_run, tmp_path_factory) -> Path:
    """The tiny world run tuned in imagination for 2 updates, uninterrupted."""
    out = tmp_path_factory.mktemp("rl-imagined")
    wrl.tune(world_run, [*TINY_IMAGINED, f"out_dir={out}", "name=dream"], **QUIET)
    return out / "dream"


def test_imagined_episodes_start_real_and_carry_the_models_rewards(world_run, monkeypatch, real_calls):
    run = load_run(world_run)
    lay = run.layout
    seeds = [split_seed("rl", 0, i) for i in range(4)]
    starts = imagined.real_starts("BabyAI-GoToLocal-v0", seeds)
    assert real_calls == {"reset": 4, "step": 0}
    told = []  # the rewards BatchedWorldModelEnv decoded from the model's reward tokens, step by step
    step = BatchedWorldModelEnv.step

    def recording(self, actions):
        out = step(self, actions)
        told.append(out[1].copy())
        return out

    monkeypatch.setattr(BatchedWorldModelEnv, "step", recording)
    res = imagined.imagine_episodes(run.model, lay, starts, envs=3, seed=1)
    assert real_calls == {"reset": 4, "step": 0}  # imagination never stepped the real environment
    assert [r.seed for r in res] == seeds
    reward_ids = np.arange(lay.reward.vocab_size) + lay.offset["reward"]
    assert np.array_equal(lay.reward_ids(lay.decode_reward(reward_ids)), reward_ids)  # PPO's stream re-reads the same tokens
    bins = set(lay.decode_reward(reward_ids).tolist())
    for r, s in zip(res, starts):
        ep = r.episode
        assert all(np.array_equal(ep.obs[k][0], v) for k, v in s.fields.items())  # the real first observation
        assert ep.mission == s.mission and 1 <= ep.length <= s.max_steps
        assert ep.terminated or ep.truncated  # every episode ran to an end, imagined or the level's step limit
        assert set(ep.reward.tolist()) <= bins and r.ret == pytest.approx(float(ep.reward.sum()))
    told.clear()
    one_by_one = imagined.imagine_episodes(run.model, lay, starts[:2], envs=1, seed=1)  # a stream per wave: no compaction
    assert np.array_equal(np.concatenate(told), np.concatenate([r.episode.reward for r in one_by_one]))

def test_imagination_temperature_zero_is_argmax_and_lower_temperatures_keep_likelier_tokens(world_run):
    """rl.imagine_temperature: 0 imagines exactly the greedy world; a low temperature stays closer to it than
    sampling at 1 does (fewer unlikely tokens), over the same real starts and action sequence."""
    run = load_run(world_run)
    lay = run.layout
    starts = imagined.real_starts("BabyAI-GoToLocal-v0", [split_seed("rl", 0, i) for i in range(6)])
    missions = [s.mission for s in starts]
    first = {k: np.stack([s.fields[k] for s in starts]) for k in starts[0].fields}
    actions = np.random.default_rng(0).integers(0, lay.n_actions, size=(5, len(starts)))

    def frames(**kw):
        sim = BatchedWorldModelEnv(run.model, lay, "tokens", seed=3, **kw)
        sim.reset(missions, first)
        out = []
        for a in actions:
            sim.step(a)
            out.append(sim.last_ids.copy())
        return np.stack(out)

    greedy = frames(greedy=True)
    assert np.array_equal(frames(greedy=False, temperature=0.0), greedy)
    hot = frames(greedy=True, temperature=1.0)  # temperature overrides greedy
    assert not np.array_equal(hot, greedy)
    cool = frames(temperature=0.1)
    assert (cool == greedy).mean() > (hot == greedy).mean()
    with pytest.raises(ValueError, match="temperature must be >= 0"):
        BatchedWorldModelEnv(run.model, lay, "tokens", temperature=-0.5)


def test_imagined_tune_counts_only_the_resets_as_real(tuned, world_run):
    got = rows(tuned)
    assert [r["update"] for r in got] == [1, 2]
    assert [r["episodes"] for r in got] == [3, 6]
    assert [r["real_steps"] for r in got] == [3, 6]  # one real reset per imagined episode, nothing else
    assert [r["env_steps"] for r in got] == [0, 0]
    assert 0 < got[0]["imagined_steps"] < got[1]["imagined_steps"]
    assert all("success" not in r and 0.0 <= r["imagined_success"] <= 1.0 for r in got)  # never mistaken for real success
    assert "wm" not in got[1]  # no world-model loss on imagined transitions
    assert [r["value_only"] for r in got] == [True, False]
    assert got[0]["kl"] == 0.0
    run = load_run(tuned)  # `worldloom eval` reads it and plays the real environment
    assert run.state["step"] == 2 and run.is_world and run.state["real_steps"] == 6
    src = load_run(world_run)
    changed = [k for k, v in run.model.state_dict().items() if not torch.equal(v, src.model.state_dict()[k])]
    assert changed, "the PPO update (update 2) should have moved the policy"


def test_tune_in_imagination_steps_no_real_environment(world_run, tmp_path, real_calls, monkeypatch):
    monkeypatch.setattr(wrl, "run_episodes", lambda *a, **k: pytest.fail("imagined PPO played the real environment"))
    out = wrl.tune(world_run, [*TINY_IMAGINED, "rl.updates=1", f"out_dir={tmp_path}", "name=dream"], **QUIET)
    assert real_calls == {"reset": 3, "step": 0}
    assert out["real_steps"] == 3 and out["env_steps"] == 0 and out["imagined_steps"] > 0


def test_kl_to_the_reference_is_zero_at_the_start_and_the_update_moves_the_policy(world_run, tmp_path):
    """One update, one minibatch, no warm-up: the only gradient step sees the policy still equal to the reference."""
    wrl.tune(world_run, ["rl.world=imagined", "rl.updates=1", "rl.envs=2", "rl.episodes=2", "rl.epochs=1",
                         "rl.minibatch=100000", "rl.value_warmup=0", "rl.target_kl=0", f"out_dir={tmp_path}", "name=k"], **QUIET)
    row = rows(tmp_path / "k")[0]
    assert row["minibatches"] == 1 and not row["value_only"]
    assert row["kl"] == 0.0 and row["approx_kl"] == pytest.approx(0.0, abs=1e-6)
    src, new = load_run(world_run).model.state_dict(), load_run(tmp_path / "k").model.state_dict()
    assert any(not torch.equal(v, src[k]) for k, v in new.items())


def killed_in_update_two_then_resumed(world_run, args: list[str], run_dir: Path, monkeypatch, step_at_kill: int) -> None:
    """Tune with ``args`` into ``run_dir``, killed inside update 2's imagination, then resumed from the CLI."""
    real = wrl.imagine_episodes
    calls = []

    def dies_in_update_two(*a, **k):
        calls.append(1)
        if len(calls) == 2:
            raise RuntimeError("killed")
        return real(*a, **k)

    monkeypatch.setattr(wrl, "imagine_episodes", dies_in_update_two)
    with pytest.raises(RuntimeError, match="killed"):
        wrl.tune(world_run, [*args, f"out_dir={run_dir.parent}", f"name={run_dir.name}"], **QUIET)
    monkeypatch.setattr(wrl, "imagine_episodes", real)
    assert load_run(run_dir).state["step"] == step_at_kill
    assert main(["tune", "ppo", "--resume", str(run_dir), "--no-progress"]) == 0


def assert_same_run(a_dir: Path, b_dir: Path) -> None:
    a, b = final_state(a_dir), final_state(b_dir)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    strip = lambda rs: [{k: v for k, v in r.items() if k != "elapsed"} for r in rs]  # noqa: E731
    assert strip(rows(a_dir)) == strip(rows(b_dir))


@pytest.mark.parametrize("every", [1, 2])
def test_resumed_after_a_kill_continues_the_same_sequence(tuned, world_run, tmp_path, monkeypatch, every):
    killed_in_update_two_then_resumed(world_run, [*TINY_IMAGINED, f"rl.checkpoint_every={every}"], tmp_path / "dream",
                                      monkeypatch, 1 if every == 1 else 0)
    assert_same_run(tuned, tmp_path / "dream")


@pytest.mark.parametrize("args, message", [
    (["rl.world=dream"], "rl.world must be one of real, imagined"),
    (["rl.world=imagined", "rl.imagine_mode=telepathy"], "rl.imagine_mode must be one of"),
    (["rl.world=imagined", "rl.imagine_temperature=-1"], "rl.imagine_temperature must be >= 0"),
    (["rl.world=imagined", "rl.imagine_greedy=true", "rl.imagine_temperature=0.5"], "contradicts rl.imagine_temperature"),
    (["rl.world=imagined", "rl.imagine_mode=fast", "rl.imagine_temperature=0.5"], "use tokens or parallel"),
    (["rl.collect_every=2"], "rl.collect_every is for rl.world=imagined"),
    (["rl.world=imagined", "rl.collect_every=2"], "it needs rl.wm_coef > 0"),
    (["rl.world=imagined", "rl.wm_coef=1", "rl.collect_every=-1"], "must be >= 0"),
])
def test_imagined_config_errors_are_one_line(world_run, tmp_path, capsys, args, message):
    assert main(["tune", "ppo", str(world_run), *args, f"out_dir={tmp_path}", "--no-progress"]) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and err.startswith("worldloom: error:") and len(err.splitlines()) == 1


def test_world_model_loss_in_imagination_trains_on_real_episodes_only(world_run, world_dataset, tmp_path, monkeypatch,
                                                                        real_calls):
    """rl.wm_coef > 0 in imagination: the world-model loss reads windows of the run's training episodes, never imagined ones."""
    collate, seen = wrl.collate, []

    def spy(rows, layout, wm):
        if wm:
            seen.append(rows)
        return collate(rows, layout, wm)

    monkeypatch.setattr(wrl, "collate", spy)
    tu = wrl.start_tune(world_run, ["rl.world=imagined", "rl.wm_coef=0.5", "rl.updates=1", "rl.envs=2", "rl.episodes=2",
                                    "rl.epochs=1", "rl.value_warmup=0", f"out_dir={tmp_path}", "name=wm"], log=lambda *a: None)
    train = [e for e in load_dataset(world_dataset).episodes("train") if e.length > 0]
    first = tu.layout.episode(train[0])
    assert len(tu.real_rows) >= len(train)
    assert np.array_equal(tu.real_rows[0][0][: len(first.prefix)], first.prefix)  # a real training episode's stream
    row = wrl.tune_ppo(tu, **QUIET) and rows(tmp_path / "wm")[0]
    assert row["wm"] > 0 and row["real_steps"] == 2 and real_calls == {"reset": 2, "step": 0}
    real_ids = {id(r) for r in tu.real_rows}
    assert seen and all(id(r) in real_ids for batch in seen for r in batch)


COLLECTING = [*TINY_IMAGINED, "rl.wm_coef=0.5", "rl.collect_every=1", "rl.collect_episodes=2", "rl.collect_steps=5"]


def test_the_agent_collects_real_episodes_for_the_world_model(world_run, tmp_path, monkeypatch):
    """rl.collect_every (IRIS's loop): before updates 1 and 2 the current agent plays 2 real episodes (cut at 5 steps);
    they are counted as real calls, kept in collected/, and join the world-model loss's real windows."""
    sizes = []
    real_wm_loss = wrl.real_wm_loss
    monkeypatch.setattr(wrl, "real_wm_loss", lambda model, layout, real_rows, n, gen: (sizes.append(len(real_rows)),
                                                                                        real_wm_loss(model, layout, real_rows, n, gen))[1])
    tu = wrl.start_tune(world_run, [*COLLECTING, f"out_dir={tmp_path}", "name=iris"], log=lambda *a: None)
    base = len(tu.real_rows)  # the world run's own training episodes
    out = wrl.tune_ppo(tu, **QUIET)
    got = rows(tmp_path / "iris")
    assert [r["collected"] for r in got] == [2, 4]
    assert all(0.0 <= r["collected_success"] <= 1.0 for r in got)  # the agent's real success, round by round
    assert 0 < got[0]["env_steps"] <= 10 and got[1]["env_steps"] <= 20
    assert [r["real_steps"] - r["env_steps"] for r in got] == [3 + 2, 6 + 4]  # resets: imagined starts + collected episodes
    assert out["collected"] == 4 and out["env_steps"] == got[1]["env_steps"]
    shards = sorted((tmp_path / "iris" / "collected").glob("shard-*.npz"))
    assert [p.name for p in shards] == ["shard-00000.npz", "shard-00001.npz"]
    from worldloom.world.data.episodes import read_shard
    eps = [e for p in shards for e in read_shard(p)]
    assert len(eps) == 4 and all(e.length <= 5 for e in eps) and len({e.seed for e in eps}) == 4
    extra = len(wrl.collected_windows(tmp_path / "iris", tu.model, tu.layout, tu.cfg, 2))  # as a resumed run reads them back
    assert extra >= 4 and len(tu.real_rows) == base + extra
    assert sizes and sizes[-1] == base + extra  # the world-model loss of update 2 drew from both rounds' episodes too


def test_a_collecting_run_resumed_after_a_kill_continues_the_same_sequence(world_run, tmp_path, monkeypatch):
    """Killed after update 2's collection round, before its checkpoint: the resumed run reads round 1 back."""
    wrl.tune(world_run, [*COLLECTING, f"out_dir={tmp_path}", "name=whole"], **QUIET)
    killed_in_update_two_then_resumed(world_run, COLLECTING, tmp_path / "cut", monkeypatch, 1)
    assert_same_run(tmp_path / "whole", tmp_path / "cut")


def test_real_world_is_still_the_default():
    cfg = wrl.RLConfig()
    assert cfg.world == "real" and cfg.wm_coef == 1.0
    assert wrl.RLConfig(world="imagined").wm_coef == 0.0


def test_tune_in_imagination_on_an_encoded_run(world_dataset, tmp_path):
    """stream.obs=encoded: the observation decoder imagines whole frames; the windows count model positions."""
    from worldloom.config import build_config
    from worldloom.train import train

    from conftest import TINY_WORLD

    cfg = build_config(None, [*TINY_WORLD, f"data.path={world_dataset}", f"out_dir={tmp_path}", "name=enc",
                              "stream.obs=encoded", "stream.obs_vectors=2"])
    train(cfg, progress=False, log=lambda *a: None)
    wrl.tune(cfg.run_dir, ["rl.world=imagined", "rl.updates=1", "rl.envs=2", "rl.episodes=2", "rl.epochs=1",
                           "rl.value_warmup=0", f"out_dir={tmp_path}", "name=dream"], **QUIET)
    row = rows(tmp_path / "dream")[0]
    assert row["real_steps"] == 2 and row["imagined_steps"] >= 2 and row["kl"] == 0.0


def test_a_minutes_budget_stops_before_the_next_update(world_run, tmp_path):
    """rl.max_minutes: the first update always runs; none starts after the budget (here a few milliseconds)."""
    wrl.tune(world_run, [*TINY_IMAGINED, "rl.updates=3", "rl.max_minutes=0.00001", f"out_dir={tmp_path}", "name=b"], **QUIET)
    assert [r["update"] for r in rows(tmp_path / "b")] == [1]
    with pytest.raises(Exception, match="rl.max_minutes"):
        wrl.tune(world_run, [*TINY_IMAGINED, "rl.max_minutes=-1", f"out_dir={tmp_path}", "name=c"], **QUIET)
