"""Data collection: adapters, the episode schema on disk, and collection by the BabyAI bot.

Everything runs on BabyAI-GoToLocal-v0 (episodes of ~5 steps), a few episodes at a time.
"""

from __future__ import annotations

import io
import json
import shutil
import signal
import time
import zipfile

import numpy as np
import pytest

from worldloom.errors import DataError, EnvError
from worldloom.world.data import collect
from worldloom.world.data.collect import (
    EVAL_SEED_BASE,
    TRAIN_SEED_BASE,
    VAL_SEED_BASE,
    collect_dataset,
    split_seed,
)
from worldloom.world.envs import MiniGridAdapter, make_adapter
from worldloom.world.data.episodes import Episode, load_dataset, read_shard, write_shard

ENV = "BabyAI-GoToLocal-v0"
# Half the episodes perturbed, every other step random: random actions show up in a few episodes.
SETTINGS = dict(seed=3, perturbed_fraction=0.5, epsilon=0.5, bot_timeout=2.0, progress=False, log=lambda *a: None)


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    """A small dataset collected in-process: 8 train and 4 val episodes, 2 per shard."""
    out = tmp_path_factory.mktemp("episodes") / "data"
    meta = collect_dataset(out, ENV, 8, 4, workers=1, shard_size=3, **SETTINGS)
    return out, meta


def one_line(e: pytest.ExceptionInfo) -> str:
    msg = str(e.value)
    assert "\n" not in msg
    return msg


# ------------------------------------------------------------------------------ adapters


def test_minigrid_adapter_declares_schema_and_observes(capsys):
    a = make_adapter(ENV)
    assert isinstance(a, MiniGridAdapter) and a.kind == "minigrid"
    assert a.obs_fields == {"image": ((7, 7, 3), np.dtype(np.uint8)), "direction": ((), np.dtype(np.uint8))}
    assert a.n_actions == 7 and a.action_names[:3] == ("left", "right", "forward") and a.action_names[-1] == "done"
    env = a.make()
    for s in range(20):  # some layouts are rejected and re-sampled; the level prints that
        obs, _ = env.reset(seed=s)
    assert capsys.readouterr().out == ""
    o = a.observe(obs)
    for name, (shape, dtype) in a.obs_fields.items():
        assert o[name].shape == shape and o[name].dtype == dtype
    assert a.mission(obs).startswith("go to") and a.max_steps(env) > 0
    assert make_adapter("MiniGrid-Empty-5x5-v0").mission({"image": 0, "direction": 0}) == ""


def test_unknown_env_suggests_closest_id():
    with pytest.raises(EnvError) as e:
        make_adapter("BabyAI-GoToLocl-v0")
    assert one_line(e) == "unknown environment 'BabyAI-GoToLocl-v0'; did you mean 'BabyAI-GoToLocal-v0'?"
    with pytest.raises(EnvError, match="unknown environment 'CartPole-v1'; supported"):
        make_adapter("CartPole-v1")


# ------------------------------------------------------------------------------- seeds


def test_split_seeds_never_overlap(dataset):
    assert (TRAIN_SEED_BASE, VAL_SEED_BASE, EVAL_SEED_BASE) == (0, 1_000_000, 2_000_000)
    assert split_seed("train", 3, 0) == 3 and split_seed("val", 3, 5) == 1_000_008 and split_seed("eval", 0, 1) == 2_000_001
    last = collect.SEEDS_PER_SPLIT - 1
    assert split_seed("train", 7, last) < split_seed("val", 7, 0) and split_seed("val", 7, last) < split_seed("eval", 7, 0)
    with pytest.raises(ValueError):
        split_seed("train", 0, collect.SEEDS_PER_SPLIT)

    out, meta = dataset
    ds = load_dataset(out)
    train = {ep.seed for ep in ds.episodes("train")}
    val = {ep.seed for ep in ds.episodes("val")}
    assert not train & val
    assert min(train) == 3 and max(train) < VAL_SEED_BASE <= min(val) - 3 < EVAL_SEED_BASE
    assert meta["splits"]["train"]["seeds"]["last"] < meta["splits"]["val"]["seeds"]["first"]


# ------------------------------------------------------------------------------- schema


def test_shard_round_trip_is_exact(tmp_path):
    c = collect._Collector(collect._Settings(ENV, 0, 1.0, 0.3, 2.0))
    episodes = [ep for ep in c.run(list(range(6))) if isinstance(ep, Episode)]
    assert len(episodes) >= 5
    # A hand-made episode too: non-ASCII mission, zero-length mission, odd rewards.
    episodes.append(Episode(seed=2**40, mission="", obs={k: v[:1] for k, v in episodes[0].obs.items()},
                            action=[], reward=[], terminated=False, truncated=False, random_action=[]))
    episodes.append(Episode(seed=9, mission="aller à la boîte", obs={k: v[:3] for k, v in episodes[0].obs.items()},
                            action=[6, 0], reward=[0.1, -2.5e-8], terminated=False, truncated=True,
                            random_action=[True, False], epsilon=0.2))
    path = tmp_path / "sub" / "shard-00000.npz"
    write_shard(path, episodes)
    back = read_shard(path)
    assert back == episodes
    assert [p.name for p in path.parent.iterdir()] == ["shard-00000.npz"]  # no temp file left
    ep = back[0]
    assert ep.action.dtype == np.int64 and ep.reward.dtype == np.float32 and ep.random_action.dtype == bool
    assert ep.obs["image"].shape == (ep.length + 1, 7, 7, 3) and ep.obs["direction"].shape == (ep.length + 1,)
    with np.load(path, allow_pickle=False) as z:
        assert z["action"].dtype == np.uint8 and z["mission"].dtype.kind == "U" and int(z["schema"]) == 1
        assert z["obs_offset"].tolist()[-1] == len(z["obs_image"]) and len(z["step_offset"]) == len(episodes) + 1


def test_dataset_layout_and_meta(dataset):
    out, meta = dataset
    assert json.loads((out / "meta.json").read_text()) == meta
    assert meta["schema"] == 1 and meta["env_id"] == ENV and meta["adapter"] == "minigrid"
    assert meta["obs_fields"]["image"] == {"shape": [7, 7, 3], "dtype": "uint8"}
    assert meta["n_actions"] == 7 and len(meta["action_names"]) == 7
    assert meta["collection"]["epsilon"] == 0.5 and meta["collection"]["seed"] == 3
    ds = load_dataset(out)
    for split, n in (("train", 8), ("val", 4)):
        info = meta["splits"][split]
        eps = ds.episodes(split)
        assert len(eps) == info["episodes"] == n
        assert info["shards"] == [f"{split}/shard-{i:05d}.npz" for i in range(-(-n // 3))]
        assert info["steps"] == sum(ep.length for ep in eps)
        assert info["successes"] == sum(ep.success for ep in eps)
        assert info["perturbed"] == sum(ep.perturbed for ep in eps)
        assert [ep.seed for ep in eps] == sorted(ep.seed for ep in eps)
        assert info["seeds"]["tried"] == n + info["dropped"]
    with pytest.raises(DataError, match="no split 'test'"):
        ds.episodes("test")


def test_perturbed_and_expert_episodes(dataset):
    ds = load_dataset(dataset[0])
    eps = ds.episodes("train") + ds.episodes("val")
    perturbed = [ep for ep in eps if ep.perturbed]
    expert = [ep for ep in eps if not ep.perturbed]
    assert perturbed and expert
    assert all(ep.epsilon == np.float32(0.5) for ep in perturbed)
    assert any(ep.random_action.any() for ep in perturbed)
    assert all(ep.epsilon == 0.0 and not ep.random_action.any() for ep in expert)
    for ep in eps:
        assert ep.success == (ep.terminated and ep.reward[-1] > 0)
        assert ep.terminated != ep.truncated  # GoToLocal episodes end by success or the step limit
        assert ep.mission.startswith("go to") and ((ep.action >= 0) & (ep.action < 7)).all()
    assert all(ep.success for ep in expert)  # the bot solves GoToLocal

    # perturbed_fraction 0 (or epsilon 0): pure expert data.
    c = collect._Collector(collect._Settings(ENV, 0, 0.0, 0.5, 2.0))
    assert not any(ep.perturbed or ep.random_action.any() for ep in c.run([0, 1, 2, 3]) if isinstance(ep, Episode))


def test_same_seeds_same_data_for_any_worker_count(dataset, tmp_path):
    out1, meta1 = dataset
    meta2 = collect_dataset(tmp_path / "w2", ENV, 8, 4, workers=2, shard_size=3, **SETTINGS)
    a, b = load_dataset(out1), load_dataset(tmp_path / "w2")
    for split in ("train", "val"):
        assert a.episodes(split) == b.episodes(split)
        strip = lambda m: {k: v for k, v in m["splits"][split].items() if k != "seconds"}  # noqa: E731
        assert strip(meta1) == strip(meta2)


def test_ranks_share_the_collection_and_get_the_data_of_one_process(dataset, tmp_path):
    """Two gloo ranks (as under torchrun): each plays its own seeds, rank 0 writes the folder, and
    the dataset equals the one-process dataset of the fixture."""
    import sys
    from pathlib import Path

    import torch.multiprocessing as mp

    from worldloom.spawn import free_port

    sys.path.insert(0, str(Path(__file__).parent))
    from dist_worker import collect_rank

    out1, meta1 = dataset
    out2 = tmp_path / "ranks"
    kwargs = dict(env_id=ENV, train_episodes=8, val_episodes=4, workers=1, shard_size=3,
                  **{k: v for k, v in SETTINGS.items() if k != "log"})  # a lambda does not cross processes
    errors = mp.get_context("spawn").SimpleQueue()
    mp.start_processes(collect_rank, args=(2, free_port(), str(out2), kwargs, errors), nprocs=2, join=True,
                       start_method="spawn")
    assert errors.empty(), errors.get()
    played = [set(map(int, Path(f"{out2}.played-{r}").read_text().split())) for r in range(2)]
    assert played[0] and played[1] and not played[0] & played[1]  # both ranks played, no seed twice
    a, b = load_dataset(out1), load_dataset(out2)
    meta2 = json.loads((out2 / "meta.json").read_text())
    for split in ("train", "val"):
        assert a.episodes(split) == b.episodes(split)
        strip = lambda m: {k: v for k, v in m["splits"][split].items() if k != "seconds"}  # noqa: E731
        assert strip(meta1) == strip(meta2)


# ------------------------------------------------------------------------ dropped episodes


def test_bot_timeout_and_bot_errors_are_dropped_and_replaced(tmp_path, monkeypatch):
    made = []

    class FlakyBot(collect.BabyAIBot):
        """The 2nd bot loops forever in replan(); the 4th raises."""

        def __init__(self, env):
            super().__init__(env)
            made.append(self)
            self.nth = len(made)

        def replan(self, action_taken=None):
            if self.nth == 2:
                while True:
                    pass
            if self.nth == 4:
                raise RuntimeError("lost")
            return super().replan(action_taken)

    monkeypatch.setattr(collect, "BabyAIBot", FlakyBot)
    old_handler = signal.getsignal(signal.SIGALRM)
    t0 = time.perf_counter()
    meta = collect_dataset(tmp_path / "d", ENV, 4, 0, workers=1, bot_timeout=0.2,
                           **{k: v for k, v in SETTINGS.items() if k != "bot_timeout"})
    assert time.perf_counter() - t0 < 10
    train = meta["splits"]["train"]
    assert train["episodes"] == 4 and train["dropped"] == 2
    assert train["dropped_seeds"] == [{"seed": 4, "reason": "timeout"}, {"seed": 6, "reason": "RuntimeError"}]
    assert [ep.seed for ep in load_dataset(tmp_path / "d").episodes("train")] == [3, 5, 7, 8]
    assert train["seeds"] == {"first": 3, "last": 8, "tried": 6}
    assert signal.getsignal(signal.SIGALRM) is old_handler
    assert signal.getitimer(signal.ITIMER_REAL) == (0.0, 0.0)


# ---------------------------------------------------------------------------- clear errors


def test_shard_errors_are_one_line(tmp_path, dataset):
    with pytest.raises(DataError) as e:
        read_shard(tmp_path / "nope.npz")
    assert one_line(e) == f"episode shard not found: {tmp_path / 'nope.npz'}"

    good = dataset[0] / "train" / "shard-00000.npz"
    data = good.read_bytes()
    cases = {
        "garbage.npz": b"this is not a zip file at all" * 10,
        "truncated.npz": data[: len(data) // 2],
        "empty.npz": b"",
    }
    arrays = dict(np.load(good, allow_pickle=False))
    buf = io.BytesIO()
    np.savez(buf, **{k: v for k, v in arrays.items() if k != "step_offset"})
    cases["missing.npz"] = buf.getvalue()
    buf = io.BytesIO()
    np.savez(buf, **{**arrays, "obs_offset": arrays["obs_offset"] + 1})
    cases["offsets.npz"] = buf.getvalue()
    for name, bad in {"object": {"mission": arrays["mission"].astype(object)},
                      "scalar": {"seed": np.int64(3)}, "dtype": {"reward": arrays["reward"].astype("U8")}}.items():
        buf = io.BytesIO()
        np.savez(buf, **{**arrays, **bad})
        cases[f"{name}.npz"] = buf.getvalue()
    buf = io.BytesIO()
    np.save(buf, arrays["action"])
    cases["plain.npy.npz"] = buf.getvalue()
    buf = io.BytesIO()  # a member whose compressed bytes are damaged
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_STORED) as z:
        z.writestr("action.npy", b"\x93NUMPY garbage")
    cases["member.npz"] = buf.getvalue()
    for name, blob in cases.items():
        p = tmp_path / name
        p.write_bytes(blob)
        with pytest.raises(DataError) as e:
            read_shard(p)
        msg = one_line(e)
        assert msg.startswith(f"episode shard {p} is corrupt (") and msg.endswith("); collect the data again"), msg


def test_dataset_errors_are_one_line(tmp_path, dataset):
    with pytest.raises(DataError) as e:
        load_dataset(tmp_path / "none")
    assert one_line(e) == f"no episode dataset in {tmp_path / 'none'} (missing meta.json); run `worldloom collect` first"

    copy = tmp_path / "copy"
    shutil.copytree(dataset[0], copy)
    (copy / "val" / "shard-00001.npz").unlink()
    ds = load_dataset(copy)
    assert len(ds.episodes("train")) == 8
    with pytest.raises(DataError, match="episode shard not found: .*shard-00001.npz$"):
        ds.episodes("val")

    (copy / "meta.json").write_text("{not json")
    with pytest.raises(DataError) as e:
        load_dataset(copy)
    assert one_line(e).startswith(f"{copy / 'meta.json'} is corrupt (JSONDecodeError")
    (copy / "meta.json").write_text(json.dumps({"schema": 99}))
    with pytest.raises(DataError, match="has schema 99; this worldloom reads schema 1"):
        load_dataset(copy)


def test_collect_refuses_bad_requests(tmp_path, dataset):
    with pytest.raises(DataError) as e:
        collect_dataset(dataset[0], ENV, 2, 0, workers=1, **SETTINGS)
    assert one_line(e) == f"{dataset[0]} already holds a collected dataset; pick another --out or delete it"
    with pytest.raises(EnvError, match="did you mean 'BabyAI-GoToLocal-v0'"):
        collect_dataset(tmp_path / "x", "BabyAI-GoToLocl-v0", 2, 0, workers=1, **SETTINGS)
    with pytest.raises(EnvError, match="BabyAI-\\* levels only"):
        collect_dataset(tmp_path / "x", "MiniGrid-Empty-5x5-v0", 2, 0, workers=1, **SETTINGS)
    with pytest.raises(DataError, match="epsilon must be in"):
        collect_dataset(tmp_path / "x", ENV, 2, 0, workers=1, **{**SETTINGS, "epsilon": 1.5})
    assert not (tmp_path / "x").exists()


def test_interrupted_collection_is_not_a_dataset(tmp_path):
    # Shards of an interrupted run and no meta.json: not loadable, and collecting again works.
    out = tmp_path / "d"
    (out / "train").mkdir(parents=True)
    (out / "train" / "shard-00007.npz").write_bytes(b"stale")
    with pytest.raises(DataError, match="missing meta.json"):
        load_dataset(out)
    collect_dataset(out, ENV, 2, 1, workers=1, **SETTINGS)
    assert sorted(p.name for p in (out / "train").iterdir()) == ["shard-00000.npz"]
    assert len(load_dataset(out).episodes("val")) == 1
