"""DAgger: expert labels in the episode schema and in the training targets, the bot as a labeller
of another policy's steps, on-policy collection with the model, and the staged main job."""

from __future__ import annotations

import json
import signal

import numpy as np
import pytest
import torch

from worldloom.config import StreamConfig, build_config
from worldloom.errors import DataError
from worldloom.tokenize import GridTokenizer
from worldloom.world.data import collect
from worldloom.world.data.collect import BotTeacher, split_seed
from worldloom.world.data.packing import EpisodeData
from worldloom.world.envs import make_adapter
from worldloom.world.data.episodes import Episode, load_dataset, read_shard, write_shard
from worldloom.world.stream import K_ACTION, StreamLayout

from conftest import TINY_WORLD, WORLD_ENV


@pytest.fixture(scope="module")
def episodes(world_dataset):
    return load_dataset(world_dataset).episodes("train")


def _with_labels(ep: Episode, label) -> Episode:
    return Episode(seed=ep.seed, mission=ep.mission, obs=ep.obs, action=ep.action, reward=ep.reward,
                   terminated=ep.terminated, truncated=ep.truncated, random_action=ep.random_action,
                   epsilon=ep.epsilon, label=label)


# ------------------------------------------------------------------ schema


def test_labels_round_trip_and_are_optional(tmp_path, episodes):
    plain = episodes[:3]
    write_shard(tmp_path / "plain.npz", plain)
    with np.load(tmp_path / "plain.npz", allow_pickle=False) as z:
        assert "label" not in z.files  # demonstrations need no labels
    assert read_shard(tmp_path / "plain.npz") == plain

    ep = plain[0]
    label = (ep.action + 1) % 7
    label[0] = -1
    labelled = [_with_labels(ep, label), *(_with_labels(e, e.policy_label) for e in plain[1:])]
    write_shard(tmp_path / "lab.npz", labelled)
    back = read_shard(tmp_path / "lab.npz")
    assert back == labelled and back[0].label.dtype == np.int64
    assert np.array_equal(back[0].policy_label, label)
    assert not np.array_equal(back[0].policy_label, back[0].action)


def test_policy_label_without_labels_is_the_non_random_action(episodes):
    ep = next(e for e in episodes if e.random_action.any())
    assert np.array_equal(ep.policy_label, np.where(ep.random_action, -1, ep.action))


def test_bad_labels_are_refused(tmp_path, episodes):
    ep = episodes[0]
    with pytest.raises(ValueError, match="label must have shape"):
        write_shard(tmp_path / "x.npz", [_with_labels(ep, np.zeros(ep.length + 1, np.int64))])
    with pytest.raises(ValueError, match="labels must be in"):
        write_shard(tmp_path / "x.npz", [_with_labels(ep, np.full(ep.length, -2))])
    write_shard(tmp_path / "ok.npz", [_with_labels(ep, ep.action)])
    with np.load(tmp_path / "ok.npz", allow_pickle=False) as z:
        arrays = {k: z[k] for k in z.files}
    arrays["label"] = arrays["label"][:-1]
    np.savez(tmp_path / "bad.npz", **arrays)
    with pytest.raises(DataError, match="corrupt .*label has shape"):
        read_shard(tmp_path / "bad.npz")


# ------------------------------------------------------------------ training targets


def test_labels_are_the_policy_targets_and_the_inputs_keep_the_action_taken(episodes):
    ep = max(episodes, key=lambda e: e.length)
    label = (ep.action + 1) % 7
    label[1] = -1  # no label at step 1: not a policy target
    layout = StreamLayout.build([e.mission for e in episodes], 7, StreamConfig(), GridTokenizer())
    tok = layout.episode(_with_labels(ep, label))
    data = EpisodeData(layout, [tok], [tok], StreamConfig())
    b = next(data.windows("train", 1024, 1))
    inp, tgt, w = b["input"][0].numpy(), b["target"][0].numpy(), b["weight"][0].numpy()
    at = np.flatnonzero(layout.kinds_of(inp[1:]) == K_ACTION)  # target positions j with input j+1 an action
    assert len(at) == ep.length
    assert np.array_equal(layout.decode_action(inp[at + 1]), ep.action)  # the stream holds the action taken
    want = np.where(label >= 0, label, ep.action)
    assert np.array_equal(layout.decode_action(tgt[at]), want)  # the target is the label
    assert (w[at] == 0).tolist() == (label < 0).tolist()
    other = np.ones(len(tgt), bool)
    other[at] = False
    assert np.array_equal(tgt[other][:-1], inp[1:][other[:-1]])  # every other target is the next input


# ------------------------------------------------------------------ the bot as a labeller


def test_bot_teacher_reproduces_the_collectors_labels():
    """Driven with a perturbed collected episode's actions, the teacher's labels are the bot's
    choices wherever the collector took the bot's action."""
    c = collect._Collector(collect._Settings(WORLD_ENV, 0, 1.0, 0.3, 2.0))
    eps = [e for e in c.run(list(range(8))) if isinstance(e, Episode) and e.random_action.any()]
    assert eps
    env = make_adapter(WORLD_ENV).make()
    checked = 0
    for ep in eps:
        env.reset(seed=ep.seed)
        teacher = BotTeacher(env)
        for t, a in enumerate(ep.action):
            label = teacher.label()
            if not ep.random_action[t]:
                assert label == a
                checked += 1
            env.step(int(a))
            teacher.taken(int(a))
    assert checked > 10


def test_bot_teacher_failure_ends_labels(monkeypatch):
    class Flaky(collect.BabyAIBot):
        calls = 0

        def replan(self, action_taken=None):
            Flaky.calls += 1
            if Flaky.calls == 2:
                while True:
                    pass
            return super().replan(action_taken)

    monkeypatch.setattr(collect, "BabyAIBot", Flaky)
    env = make_adapter(WORLD_ENV).make()
    env.reset(seed=1)
    old = signal.getsignal(signal.SIGALRM)
    teacher = BotTeacher(env, timeout=0.2)
    first = teacher.label()
    assert 0 <= first < 7
    env.step(first)
    teacher.taken(first)
    assert teacher.label() == -1 and teacher.failed == "timeout"
    assert teacher.label() == -1 and Flaky.calls == 2  # no more replans after a failure
    assert signal.getsignal(signal.SIGALRM) is old and signal.getitimer(signal.ITIMER_REAL) == (0.0, 0.0)


# ------------------------------------------------------------------ on-policy collection


def test_collect_onpolicy_records_what_the_model_did(world_run, tmp_path):
    from worldloom.run import load_world_run
    from worldloom.world.data.onpolicy import collect_onpolicy

    run = load_world_run(world_run)
    meta = collect_onpolicy(run, tmp_path / "op", 5, envs=3, progress=False, log=lambda *a: None)
    eps = load_dataset(tmp_path / "op").episodes("train")
    assert [e.seed for e in eps] == [split_seed("train", 0, i) for i in range(5)]
    split = meta["splits"]["train"]
    assert split["episodes"] == 5 and split["steps"] == sum(e.length for e in eps)
    labels = np.concatenate([e.label for e in eps])
    actions = np.concatenate([e.action for e in eps])
    assert split["labelled_steps"] == int((labels >= 0).sum()) > 0
    assert split["agreement"] == pytest.approx(float((labels == actions)[labels >= 0].mean()))
    env = make_adapter(WORLD_ENV).make()
    adapter = make_adapter(WORLD_ENV)
    for ep in eps:  # the stored frames are what the environment shows for the stored actions
        obs, _ = env.reset(seed=ep.seed)
        assert adapter.mission(obs) == ep.mission
        for t, a in enumerate(ep.action):
            obs, r, te, tr, _ = env.step(int(a))
            assert np.array_equal(adapter.observe(obs)["image"], ep.obs["image"][t + 1]) and r == ep.reward[t]
        assert (te, tr) == (ep.terminated, ep.truncated)
    with pytest.raises(DataError, match="already holds"):
        collect_onpolicy(run, tmp_path / "op", 5, envs=3, progress=False, log=lambda *a: None)


def test_main_job_with_dagger_pauses_collects_and_resumes(tmp_path):
    from worldloom.world.pipeline import run_world

    lines = []
    cfg = build_config("babyai", [*TINY_WORLD, f"out_dir={tmp_path}", "name=dg", "data.onpolicy_episodes=4",
                                  "data.onpolicy_at=0.5", "train.max_steps=8", "eval.plan_episodes=0"])
    res = run_world(cfg, progress=False, log=lines.append)
    run = tmp_path / "dg"
    assert any(line.startswith("paused at step 4") for line in lines)
    assert any("44 training episodes (40 demonstrations + 4 on-policy)" in line for line in lines)
    assert res["train"]["step"] == 8 and res["onpolicy"]["episodes"] == 4
    assert load_dataset(run / "onpolicy").meta["collection"]["policy"].startswith("worldloom model")
    steps = [json.loads(x)["step"] for x in (run / "metrics.jsonl").read_text().splitlines() if "loss" in x and "val" not in x]
    assert steps == list(range(1, 9))  # one schedule across the pause, no step repeated
    assert "onpolicy_s" in res["timing"]


def test_a_run_without_stop_at_is_done_not_paused_when_its_clocks_disagree(tmp_path):
    """The wall clock can reach max_minutes while the clock extrapolated from the last checkpoint is just short
    of it (fraction 0.998, budget left): that run ended its schedule and says "done"; with stop_at it paused."""
    from types import SimpleNamespace

    from worldloom.train.loop import _finish

    tr = SimpleNamespace(budget_left=lambda: True, fraction=lambda: 0.998, step=1044, val_loss=0.22, elapsed=lambda: 630.0,
                         run_dir=tmp_path, model=SimpleNamespace(num_params=lambda: 1), precision="fp32")
    said = []
    _finish(tr, said.append)
    _finish(tr, said.append, stop_at=0.5)
    assert said[0].startswith("done: step 1044") and said[1].startswith("paused at step 1044")
