"""The world recipe through the command line: collect -> train -> eval -> imagine, and its errors."""

from __future__ import annotations

import json
import shutil

import pytest
from PIL import Image

from worldloom.cli import main

from conftest import TINY_WORLD


def run_cli(capsys, *argv):
    rc = main(list(argv))
    out, err = capsys.readouterr()
    return rc, out, err


@pytest.fixture(scope="module")
def pipeline_run(tmp_path_factory):
    """`worldloom train <tiny world overrides>`: collect, train, evaluate, report, in one command."""
    out = tmp_path_factory.mktemp("pipe")
    rc = main(["train", "babyai", *TINY_WORLD, f"out_dir={out}", "name=tiny", "--no-progress"])
    assert rc == 0
    return out / "tiny"


def test_train_runs_the_whole_pipeline(pipeline_run):
    run = pipeline_run
    for name in ("data/meta.json", "stream/stream.json", "config.yaml", "metrics.jsonl", "eval.json", "report.md",
                 "imagined.gif", "learning_curves.png", "open_loop.png", "success.png"):
        assert (run / name).is_file(), name
    res = json.loads((run / "eval.json").read_text())
    assert res["real"]["episodes"] == 6 and 0 <= res["real"]["success"] <= 1
    assert res["real"]["seeds"] == [2_000_000, 2_000_005]  # evaluation seeds, never collected
    assert res["plan"]["episodes"] == 2
    assert set(res["open_loop"]["horizons"]) == {"1", "5", "10"}
    assert 0 <= res["world_model"]["expert"]["frame"] <= 1
    wm = res["world_model"]["expert"]  # frames that reveal never-seen objects are counted apart
    assert 0 <= wm["novel"] <= 1 and wm["frame_known_n"] == round(wm["frame_n"] * (1 - wm["novel"]))
    assert all("n_known" in h for h in res["open_loop"]["horizons"].values())
    report = (run / "report.md").read_text()
    assert "BabyAI-GoToLocal-v0" in report and "imagined.gif" in report and "never-seen object" in report
    with Image.open(run / "imagined.gif") as gif:
        assert gif.n_frames >= 2


def test_eval_json_and_imagine(pipeline_run, capsys, tmp_path):
    before = (pipeline_run / "eval.json").read_bytes()
    rc, out, _ = run_cli(capsys, "eval", str(pipeline_run), "--json", "--episodes", "3", "--plan-episodes", "0")
    assert rc == 0
    res = json.loads(out)
    assert res["real"]["episodes"] == 3 and "plan" not in res
    # other settings than the run's own: the run's figures stay, these go to a file of their own
    assert (pipeline_run / "eval.json").read_bytes() == before
    assert json.loads((pipeline_run / "eval-3ep-0plan.json").read_text()) == res
    gif = tmp_path / "r.gif"
    rc, out, _ = run_cli(capsys, "imagine", str(pipeline_run), "--seed", "3", "--steps", "4", "--out", str(gif))
    assert rc == 0 and "real (left) beside imagined (right)" in out
    with Image.open(gif) as im:
        assert 2 <= im.n_frames <= 5


def test_collect_verb_and_training_on_its_output(capsys, tmp_path):
    data = tmp_path / "eps"
    rc, out, _ = run_cli(capsys, "collect", "babyai", "env.id=BabyAI-GoToLocal-v0", "data.episodes=8", "data.val_episodes=4",
                         "data.workers=1", "--out", str(data), "--no-progress")
    assert rc == 0 and f"data.path={data}" in out
    meta = json.loads((data / "meta.json").read_text())
    assert meta["splits"]["train"]["episodes"] == 8 and meta["splits"]["val"]["episodes"] == 4
    rc, _, err = run_cli(capsys, "collect", "babyai", "data.episodes=8", "--out", str(data), "--no-progress")
    assert rc == 2 and err.count("\n") == 1  # the folder already holds a dataset


def test_unknown_environment_is_one_line(capsys, tmp_path):
    rc, _, err = run_cli(capsys, "train", "babyai", "env.id=BabyAI-GoToLocl-v0", f"out_dir={tmp_path}", "--no-progress")
    assert rc == 2 and err.count("\n") == 1 and "did you mean 'BabyAI-GoToLocal-v0'" in err


def test_missing_and_corrupt_shards_are_one_line(world_dataset, capsys, tmp_path):
    data = tmp_path / "eps"
    shutil.copytree(world_dataset, data)
    shard = next((data / "train").glob("shard-*.npz"))
    shard.write_bytes(b"not an npz at all")
    argv = ["train", "babyai", *TINY_WORLD, f"data.path={data}", f"out_dir={tmp_path}", "--no-progress"]
    rc, _, err = run_cli(capsys, *argv)
    assert rc == 2 and err.count("\n") == 1 and "corrupt" in err and "Traceback" not in err
    shard.unlink()
    rc, _, err = run_cli(capsys, *argv)
    assert rc == 2 and err.count("\n") == 1 and "not found" in err
    rc, _, err = run_cli(capsys, "train", "babyai", *TINY_WORLD, f"data.path={tmp_path / 'nothing'}", f"out_dir={tmp_path}", "--no-progress")
    assert rc == 2 and "worldloom collect" in err


def test_a_run_without_a_world_model_is_one_line(trained_run, capsys, tmp_path):
    rc, _, err = run_cli(capsys, "imagine", str(trained_run), "--out", str(tmp_path / "x.gif"))
    assert rc == 2 and err.count("\n") == 1 and "not a world model" in err
    rc, _, err = run_cli(capsys, "imagine", str(tmp_path / "nope"))
    assert rc == 2 and "run folder not found" in err


def test_world_run_refuses_text_verbs(pipeline_run, capsys, tmp_path):
    rc, _, err = run_cli(capsys, "generate", str(pipeline_run), "hello")
    assert rc == 2 and "world model" in err
    rc, _, err = run_cli(capsys, "export", "hf", str(pipeline_run), str(tmp_path / "hf"))
    assert rc == 2 and "world model" in err
