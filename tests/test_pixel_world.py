"""Pixel world models: BabyAI seen as pixels, streamed through an image tokenizer (worldloom.vision.stage).

One tiny `babyai-rgb` run (tokenizer stage, world model, evaluation) is shared by the tests."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from worldloom.config import build_config
from worldloom.errors import ConfigError, WorldloomError

TINY = ["data.episodes=40", "data.val_episodes=8", "vision.frames=400", "vision.val_frames=64", "vision.codebook=32",
        "vision.channels=16", "vision.code_dim=8", "vision.minutes=0", "vision.max_steps=15", "model.n_layer=1",
        "model.d_model=32", "model.n_head=2", "train.max_minutes=0", "train.max_steps=6", "train.batch_size=4",
        "train.eval_interval=3", "train.eval_batches=1", "eval.episodes=6", "eval.envs=3", "eval.plan_episodes=2",
        "eval.open_loop=4", "data.workers=1", "train.threads=1"]


@pytest.fixture(scope="module")
def pixel_run(tmp_path_factory):
    from worldloom.world.pipeline import run_world

    out = tmp_path_factory.mktemp("pix")
    cfg = build_config("babyai-rgb", TINY + [f"out_dir={out}", "name=rgb"])
    result = run_world(cfg, progress=False, log=lambda *a: None)
    return cfg, Path(cfg.run_dir), result


def test_a_pixel_world_run_trains_its_tokenizer_first_and_streams_its_codes(pixel_run):
    from worldloom.run import load_world_run
    from worldloom.vision.tokenizer import ImageTokenizer

    cfg, run_dir, result = pixel_run
    stream = json.loads((run_dir / "stream" / "stream.json").read_text())
    assert stream["obs_tokenizer"] == "image"
    tok = ImageTokenizer.from_run(run_dir / "tokenizer")  # the stage is a tokenizer run like any other
    assert tok.grid == (7, 7) and tok.vocab_size == 32
    run = load_world_run(run_dir)
    assert run.layout.obs_len == 49 and run.layout.step_len == 52  # one code per 8x8 cell, no direction token
    assert run.model.cfg.slot_grid == 0  # stream.grid_pos is off in the preset
    # the world run keeps its own copy of the tokenizer: the same codes for the same frames
    from worldloom.world.data.episodes import load_dataset

    ep = load_dataset(run_dir / "data").episodes("val")[0]
    frames = {"pixels": ep.obs["pixels"]}
    assert np.array_equal(run.layout.encode_obs(frames) - run.layout.offset["obs"], tok.encode_batch(frames))
    shutil.rmtree(run_dir / "tokenizer")  # ... and stands alone without the stage's folder
    again = load_world_run(run_dir)
    assert np.array_equal(again.layout.encode_obs(frames), run.layout.encode_obs(frames))


def test_the_evaluation_scores_pixel_imagination_on_the_cells_read_back(pixel_run):
    cfg, run_dir, result = pixel_run
    assert 0.0 <= result["real"]["success"] <= 1.0 and result["real"]["episodes"] == 6
    h1 = result["open_loop"]["horizons"]["1"]
    assert h1["n"] > 0 and 0.0 <= h1["cell"] <= 1.0
    assert h1.get("n_seen", 0) > 0  # the restated (seen cells) metric works for rgb: the symbolic views are stored
    wm = result["world_model"]["expert"]  # next frames teacher-forced: on codes, and read back as cells
    assert wm["frame_n"] > 0 and wm["frame_cells_n"] == wm["frame_n"] and 0.0 <= wm["cell_cells"] <= 1.0
    assert (run_dir / "imagined.gif").is_file()
    report = (run_dir / "report.md").read_text()
    assert "read back as MiniGrid cells" in report and "tokenizer stage" in report


def test_cells_read_back_from_real_frames_are_the_symbolic_views(pixel_run):
    from worldloom.vision.cells import CellReader
    from worldloom.world.data.episodes import load_dataset

    _, run_dir, _ = pixel_run
    eps = load_dataset(run_dir / "data").episodes("train")[:10]
    frames = {k: np.concatenate([e.obs[k] for e in eps]) for k in ("image", "pixels")}
    views = CellReader(frames).views(frames["pixels"])
    assert views.shape == frames["image"].shape and np.array_equal(views, frames["image"])


def test_open_loop_compares_codes_where_no_symbolic_view_is_stored(pixel_run):
    from worldloom.run import load_world_run
    from worldloom.world.data.episodes import load_dataset
    from worldloom.world.rollout.imagine import _compared

    _, run_dir, _ = pixel_run
    run = load_world_run(run_dir)
    ep = load_dataset(run_dir / "data").episodes("val")[0]
    real = {"pixels": ep.obs["pixels"][:3]}
    ids = run.layout.encode_obs(real)
    (pred, _), (want, _) = _compared(run.layout, run.layout.decode_obs(ids), ids, real, None)
    assert pred.shape == (3, 49, 1) and np.array_equal(pred, want)
    ids = ids.copy()
    ids[0, 5] = run.layout.offset["obs"] + (ids[0, 5] - run.layout.offset["obs"] + 1) % 32  # one code wrong
    (pred, _), (want, _) = _compared(run.layout, run.layout.decode_obs(ids), ids, real, None)
    assert (pred != want).sum() == 1


def test_stream_tokenizer_must_name_a_tokenizer_run_of_the_same_frames(tmp_path, pixel_run):
    from worldloom.vision.stage import ensure_tokenizer

    cfg = build_config("babyai-rgb", TINY + [f"out_dir={tmp_path}", f"stream.tokenizer={tmp_path / 'nope'}"])
    with pytest.raises(ConfigError, match="not a folder"):
        ensure_tokenizer(cfg, cfg.run_dir, progress=False, log=lambda *a: None)
    _, run_dir, _ = pixel_run
    cfg = build_config("babyai-rgb", TINY + [f"out_dir={tmp_path}", f"stream.tokenizer={run_dir}"])
    with pytest.raises(WorldloomError, match="not an image tokenizer"):  # a world run is not a tokenizer run
        ensure_tokenizer(cfg, cfg.run_dir, progress=False, log=lambda *a: None)


def test_a_tokenizer_of_other_frames_is_refused_in_one_line(tmp_path, monkeypatch, pixel_run):
    from worldloom.vision import stage
    from worldloom.vision.tokenizer import ImageTokenizer

    _, run_dir, _ = pixel_run

    def other_size(path):
        tok = ImageTokenizer.load(run_dir / "stream")  # the stage's tokenizer, as the world run saved it
        tok.frame_shape, tok.env_id = (64, 64, 3), "crafter"
        return tok

    monkeypatch.setattr(ImageTokenizer, "from_run", classmethod(lambda cls, p: other_size(p)))
    cfg = build_config("babyai-rgb", TINY + [f"out_dir={tmp_path}"])
    with pytest.raises(ConfigError, match=r"reads 64x64x3 frames \(trained on crafter\).*gives 56x56x3") as e:
        stage.image_tokenizer_for(cfg, run_dir)
    assert "\n" not in str(e.value)


def test_the_tokenizer_stage_needs_a_budget():
    with pytest.raises(ConfigError, match="vision.minutes"):
        build_config("babyai-rgb", ["vision.minutes=0", "vision.max_steps=0"])


def test_crafter_score_is_the_geometric_mean_of_success_rates_in_percent():
    from worldloom.world.pipeline import crafter_score

    assert crafter_score([0.0, 0.0]) == pytest.approx(0.0)
    assert crafter_score([1.0, 1.0]) == pytest.approx(100.0)
    assert crafter_score([1.0, 0.0]) == pytest.approx(np.sqrt(101.0) - 1)  # exp((ln 101 + ln 1) / 2) - 1
    assert crafter_score([0.5, 0.5, 0.0]) < 50.0 / 3 * 2  # a rare achievement pulls the score down more than the mean


def test_signed_reward_bins_keep_negative_rewards():
    from worldloom.tokenize import ScalarBins

    bins = ScalarBins(4, 1.0, -1.0)
    ids = bins.encode_batch(np.array([0.0, 1.0, -1.0, -0.1, 0.3]))
    assert ids.tolist() == [0, 4, 8, 5, 2] and bins.vocab_size == 9
    assert np.allclose(bins.decode_batch(ids), [0.0, 0.875, -0.875, -0.125, 0.375])
    assert ScalarBins(4).encode_batch(np.array([-1.0])).tolist() == [0]  # unsigned: negative rewards clip to 0


def test_crafter_from_random_play_trains_end_to_end(tmp_path):
    pytest.importorskip("crafter")
    from worldloom.run import load_world_run
    from worldloom.world.data.episodes import load_dataset
    from worldloom.world.pipeline import run_world

    cfg = build_config("crafter", [f"out_dir={tmp_path}", "name=c", "data.episodes=2", "data.val_episodes=1",
                                   "data.max_steps=8", "data.workers=1", "vision.frames=64", "vision.val_frames=16",
                                   "vision.channels=16", "vision.code_dim=8", "vision.codebook=16", "vision.minutes=0",
                                   "vision.max_steps=2", "model.n_layer=1", "model.d_model=32", "model.n_head=2",
                                   "train.max_minutes=0", "train.max_steps=2", "train.batch_size=2", "train.eval_interval=2",
                                   "train.eval_batches=1", "train.threads=1", "eval.episodes=2", "eval.envs=2",
                                   "eval.open_loop=2", "eval.max_steps=6"])
    result = run_world(cfg, progress=False, log=lambda *a: None)
    ds = load_dataset(cfg.run_dir / "data")
    eps = ds.episodes("train")
    assert ds.meta["collection"]["policy"] == "random" and all(e.length <= 8 for e in eps)
    assert all(e.random_action.all() and (e.policy_label < 0).all() for e in eps)  # random play: no policy labels
    assert load_world_run(cfg.run_dir).layout.obs_len == 64  # 8x8 codes per 64x64 frame
    assert result["real"]["mean_length"] <= 6 and "crafter_score" in result["real"]
    assert len(result["real"]["achievements"]) == 22
    rnd = result["random"]  # the uniformly random agent on the same seeds, Crafter's floor
    assert rnd["seeds"] == result["real"]["seeds"] and len(rnd["achievements"]) == 22 and rnd["mean_length"] <= 6
    assert 0.0 <= rnd["crafter_score"] <= 100.0
    assert result["open_loop"]["horizons"]["1"]["n"] > 0  # scored on codes (no symbolic view)
    # the agent learns in imagination (random play gave no labels): short imagined episodes from real resets
    from worldloom.world import rl as wrl

    out = wrl.tune(cfg.run_dir, ["rl.world=imagined", "rl.horizon=3", "rl.updates=1", "rl.envs=2", "rl.episodes=2",
                                 "rl.epochs=1", "rl.minibatch=8", "rl.value_warmup=0", f"out_dir={tmp_path}", "name=dream"],
                   progress=False, log=lambda *a: None)
    assert out["real_steps"] == 2 and out["env_steps"] == 0 and 0 < out["imagined_steps"] <= 6  # cut at the horizon


def test_a_pixel_world_given_to_the_agent_tools_is_refused_in_one_line(pixel_run):
    from worldloom.agent.tools import make_tools

    _, run_dir, _ = pixel_run
    with pytest.raises(ConfigError, match="pixel world") as e:
        make_tools(f"world={run_dir}")
    assert "\n" not in str(e.value)
    with pytest.raises(ConfigError, match="crafter is a pixel world"):
        make_tools("env=crafter")


def test_dagger_needs_the_bot():
    with pytest.raises(ConfigError, match="needs the BabyAI bot"):
        build_config("crafter", ["data.onpolicy_episodes=10"])
