"""`worldloom tune draft` (recipe draft): a small draft distilled from a target run's own generations,
sharing its tokenizer, giving `generate --draft` the plain greedy text; draft.init starts from another run;
one-line refusals; a resumed run trains on the same generations."""

from __future__ import annotations

import json
import shutil

import pytest
import yaml

from test_cli import SMALL, run_cli
from worldloom.checkpoint import latest_checkpoint
from worldloom.cli import main
from worldloom.io import load_tensors

TINY = ["draft.samples=48", "draft.prompt=8", "draft.length=24", "train.eval_interval=30", "train.lr=0.01",
        "train.warmup_steps=2", "train.threads=1", "--no-progress"]


@pytest.fixture(scope="module")
def draft_run(trained_run, tmp_path_factory):
    out = tmp_path_factory.mktemp("draft")
    assert main(["tune", "draft", str(trained_run), f"out_dir={out}", "name=d", "train.max_steps=120", *TINY]) == 0
    return out / "d"


def test_a_distilled_draft_agrees_with_its_target_and_drafts_for_it(trained_run, draft_run, capsys):
    from worldloom.recipes.draft import DraftTask
    from worldloom.run import load_run, read_run_config

    cfg, target = read_run_config(draft_run), read_run_config(trained_run)
    assert cfg.recipe == "draft" and cfg.tune.base_hash
    assert (cfg.model.n_layer, cfg.model.d_model, cfg.model.n_head) == (1, 32, 2)  # a quarter of 2 layers, half of 48 wide (at least 32)
    assert target.model.n_layer == 2 and cfg.model.context == target.model.context
    assert (draft_run / "tokenizer" / "tokenizer.json").read_text() == (trained_run / "tokenizer" / "tokenizer.json").read_text()
    saved = load_tensors(latest_checkpoint(draft_run) / "model.safetensors")
    assert "embed.weight" in saved  # every weight of its own
    res = json.loads((draft_run / "tune_eval.json").read_text())
    # the same-size model untrained agrees with the target by chance only
    fresh = load_run(draft_run).model
    for p in fresh.parameters():
        p.data.normal_(0, 0.02)
    task = DraftTask(cfg, draft_run, resuming=True)
    task.train, task.val = task.gens.cached(draft_run)
    _, chance = task.held_out(fresh, "fp32", "cpu")
    assert res["agreement"] > chance + 0.3 and res["agreement"] > 0.5
    assert res["tokens_per_forward"] > 1.5
    argv = ["generate", str(trained_run), "The dog and the cat", "--max-new-tokens", "40", "--temperature", "0"]
    plain, _ = run_cli(capsys, *argv)
    out, err = run_cli(capsys, *argv, "--draft", str(draft_run))
    assert out == plain and "mean accepted length" in err


def test_a_draft_loads_without_its_target(draft_run, tmp_path):
    from worldloom.run import load_run

    moved = tmp_path / "d"
    shutil.copytree(draft_run, moved)
    conf = yaml.safe_load((moved / "config.yaml").read_text())
    conf["tune"]["base"] = str(tmp_path / "gone")
    (moved / "config.yaml").write_text(yaml.safe_dump(conf))
    assert load_run(moved).model.cfg.n_layer == 1


def test_draft_init_starts_from_that_runs_weights(trained_run, tmp_path, monkeypatch):
    from worldloom.tune.common import tune_recipe
    from worldloom.tune.distill import Generations

    quiet = {"progress": False, "log": lambda *a: None}
    args = [*TINY[:-1], f"out_dir={tmp_path}", "name=i", f"draft.init={trained_run}", "train.max_steps=1", "train.lr=1e-6", "train.min_lr=0"]
    s = tune_recipe("draft", trained_run, args, **quiet)
    assert s["agreement"] > 0.99  # the target itself, barely moved, agrees with itself

    def no(*a, **k):
        raise AssertionError("generated again on resume")

    before = load_tensors(tmp_path / "i" / "distill.safetensors")["train"]
    monkeypatch.setattr(Generations, "generate", no)
    s = tune_recipe("draft", None, ["train.max_steps=2"], resume=tmp_path / "i", **quiet)
    assert s["step"] == 2 and (load_tensors(tmp_path / "i" / "distill.safetensors")["train"] == before).all()


def test_one_line_refusals(trained_run, tmp_path, capsys):
    base = ["tune", "draft", str(trained_run), f"out_dir={tmp_path}"]
    cases = [(["name=a", f"draft.init={trained_run}", "model.n_layer=1"], "both set the draft's model"),
             (["name=b", "draft.val_fraction=0.7"], "draft.val_fraction must be in (0, 0.5)"),
             (["name=c", "draft.prompt=4096"], "must be shorter than the draft's context"),
             (["name=d", "draft.sections=1"], "unknown config key 'draft.sections'")]
    for extra, needle in cases:
        assert main(base + extra + ["--no-progress"]) == 2
        err = capsys.readouterr().err
        assert needle in err and err.count("\n") == 1, err
    data = tmp_path / "digits.txt"
    data.write_text("0123456789 " * 400, encoding="utf-8")
    assert main(["train", "shakespeare-char", *SMALL, f"out_dir={tmp_path}", "name=digits", f"data.path={data}",
                 "--no-progress"]) == 0
    capsys.readouterr()
    assert main(base + ["name=e", f"draft.init={tmp_path / 'digits'}", *TINY]) == 2
    err = capsys.readouterr().err
    assert "has another tokenizer than the target" in err and err.count("\n") == 1
