"""The tuning recipes end to end on a tiny base run: sft, dpo/ipo, orpo, reward, prefs, eval --tasks."""

import json
import math
import shutil

import pytest
import torch

from worldloom.checkpoint import latest_checkpoint
from worldloom.cli import main
from worldloom.errors import CheckpointError, ConfigError, DataError
from worldloom.io import load_tensors
from worldloom.run import load_run
from worldloom.tune.common import tune_recipe
from worldloom.tune.evaluate import win_rate
from worldloom.tune.prefs import pairs_of

from conftest import tiny_config

QUIET = {"progress": False, "log": lambda *a: None}
FAMILIES = ["arith", "reverse", "sort", "count"]


def tiny_tune(out_dir, name, *extra):
    return [f"out_dir={out_dir}", f"name={name}", "train.max_steps=4", "train.eval_interval=2", "train.batch_size=4",
            "train.log_interval=1", "train.warmup_steps=1", "train.threads=1", "tune.eval_rows=6", *extra]


@pytest.fixture(scope="session")
def instr(tmp_path_factory):
    from worldloom.tune.tasks import make_instruct

    out = tmp_path_factory.mktemp("instr") / "instr"
    make_instruct(FAMILIES, 300, out, seed=0, test_n=40)
    return out


@pytest.fixture(scope="session")
def base_run(tmp_path_factory, instr):
    from worldloom.train import train

    cfg = tiny_config(instr / "pretrain.txt", tmp_path_factory.mktemp("base"), "base", "model.context=64",
                      "model.n_layer=2", "train.max_steps=12", "train.eval_interval=6", "train.lr=0.01")
    train(cfg, **QUIET)
    return cfg.run_dir


@pytest.fixture(scope="session")
def prefs_file(tmp_path_factory, base_run, instr):
    """Preference pairs made by hand from the training rows: the right answer over a wrong one."""
    rows = [json.loads(line) for line in (instr / "train.jsonl").read_text().splitlines()][:120]
    path = tmp_path_factory.mktemp("prefs") / "train.jsonl"
    path.write_text("".join(json.dumps({"prompt": r["prompt"], "task": r["task"], "chosen": r["response"],
                                        "rejected": r["response"][::-1] + "x"}) + "\n" for r in rows))
    return path


def test_sft_with_lora_saves_adapters_only_and_scores_held_out_rows(base_run, instr, tmp_path):
    s = tune_recipe("sft", base_run, [f"data.path={instr / 'train.jsonl'}", "lora.rank=4", *tiny_tune(tmp_path, "sft")], **QUIET)
    run_dir = tmp_path / "sft"
    saved = load_tensors(latest_checkpoint(run_dir) / "model.safetensors")
    assert saved and all(".adapters." in k for k in saved)
    assert 0.0 <= s["accuracy"] <= 1.0 and s["rows"] == 6
    assert json.loads((run_dir / "tune_eval.json").read_text())["rows"] == 6
    run = load_run(run_dir)  # base + adapters: differs from the base once trained
    x = torch.randint(0, run.cfg.model.vocab_size, (1, 16))
    assert not torch.allclose(run.model(x).logits, load_run(base_run).model(x).logits)


def test_sft_batches_weight_only_response_tokens(base_run, instr, tmp_path):
    from worldloom.recipes.sft import SFTTask
    from worldloom.tune.base import tuned_config

    cfg = tuned_config(base_run, "sft", [f"data.path={instr / 'train.jsonl'}", f"out_dir={tmp_path}"], {})
    task = SFTTask(cfg, cfg.run_dir, resuming=False)
    b = task.batch(3, torch.Generator().manual_seed(0))
    T = cfg.model.context
    assert b["input"].shape[0] == 3 and b["input"].shape[1] <= T
    tok = task.tokenizer
    for row, w in zip(b["target"], b["weight"]):
        text = tok.decode(row[w > 0].tolist())
        answers = text.split("\n")[:-1]  # each scored span is a response and its stop
        assert answers and all("Q:" not in a and "A:" not in a for a in answers)
        assert tok.decode(row[w == 0].tolist()).count("A: ") == len(answers)  # every response follows its prompt


@pytest.mark.parametrize("loss, rank", [("sigmoid", 0), ("ipo", 4)])
def test_dpo_starts_at_log2_and_its_reference_is_the_base(base_run, prefs_file, tmp_path, loss, rank):
    from worldloom.model import LWM, model_inputs
    from worldloom.recipes.dpo import DPOTask
    from worldloom.tune.base import tuned_config

    cfg = tuned_config(base_run, "dpo", [f"data.path={prefs_file}", f"dpo.loss={loss}", f"lora.rank={rank}",
                                         "dpo.beta=0.5", f"out_dir={tmp_path}"], {})
    task = DPOTask(cfg, cfg.run_dir, resuming=False)
    model = LWM(cfg.model)
    task.prepare_model(model)
    b = task.batch(4, torch.Generator().manual_seed(0))
    out = task.objective(model.eval()(**model_inputs(b)), b)
    expect = math.log(2) if loss == "sigmoid" else (1 / (2 * 0.5)) ** 2  # policy == reference: h = 0
    assert out.total.item() == pytest.approx(expect, abs=1e-5)


def test_dpo_sft_coef_adds_the_chosen_cross_entropy(base_run, prefs_file, tmp_path):
    from worldloom.model import LWM, model_inputs
    from worldloom.recipes.dpo import DPOTask
    from worldloom.tune.base import tuned_config

    cfg = tuned_config(base_run, "dpo", [f"data.path={prefs_file}", "dpo.sft_coef=0.5", f"out_dir={tmp_path}"], {})
    task = DPOTask(cfg, cfg.run_dir, resuming=False)
    model = LWM(cfg.model)
    task.prepare_model(model)
    b = task.batch(4, torch.Generator().manual_seed(1))
    out = task.objective(model.eval()(**model_inputs(b)), b)
    nll = out.parts["nll_chosen"]
    assert nll > 0 and out.total.item() == pytest.approx(math.log(2) + 0.5 * nll, abs=1e-5)


def test_dpo_resume_reproduces_the_losses(base_run, prefs_file, tmp_path):
    common = [f"data.path={prefs_file}", "lora.rank=4", "train.lr=0.001", "train.min_lr=0.001"]  # a schedule that does not depend on max_steps
    tune_recipe("dpo", base_run, [*common, *tiny_tune(tmp_path, "a"), "train.max_steps=6", "train.eval_interval=3"], **QUIET)
    tune_recipe("dpo", base_run, [*common, *tiny_tune(tmp_path, "b"), "train.max_steps=3", "train.eval_interval=3"], **QUIET)
    tune_recipe("dpo", None, ["train.max_steps=6"], resume=tmp_path / "b", **QUIET)
    rows = [[json.loads(x) for x in (tmp_path / n / "metrics.jsonl").read_text().splitlines()] for n in ("a", "b")]
    losses = [[(r["step"], r.get("loss"), r.get("val_loss")) for r in rs] for rs in rows]
    assert losses[0] == losses[1] and len(losses[0]) >= 8


def test_orpo_and_reward_runs(base_run, prefs_file, tmp_path):
    o = tune_recipe("orpo", base_run, [f"data.path={prefs_file}", *tiny_tune(tmp_path, "orpo")], **QUIET)
    assert math.isfinite(o["val_loss"]) and "accuracy" in o
    r = tune_recipe("reward", base_run, [f"data.path={prefs_file}", "lora.rank=2", *tiny_tune(tmp_path, "rm"),
                                         "train.max_steps=30", "train.eval_interval=15", "train.lr=0.003"], **QUIET)
    rm = load_run(tmp_path / "rm")
    assert rm.cfg.model.value_head and rm.model.value is not None and rm.model.value.weight.requires_grad
    assert r["pair_accuracy"] > 0.6  # reversed answers + "x" are easy to tell apart


def test_prefs_pairs_from_marked_answers():
    row = {"prompt": "what is 2+2?", "task": "arith"}
    got = ["4", "5", "5", "", "6"]
    pairs = pairs_of(row, got, [True, False, False, False, False], reference="4")
    assert [(p["chosen"], p["rejected"]) for p in pairs] == [("4", "5"), ("4", "6")]  # distinct wrong, no empty
    assert pairs_of(row, ["4", "4"], [True, True], "4") == []  # nothing to prefer
    ref = pairs_of(row, ["7"], [False], "4")
    assert ref[0]["chosen"] == "4" and ref[0]["source"] == "reference"
    assert pairs_of(row, ["7"], [False], None) == []


def test_prefs_cli_and_eval_tasks_with_baseline(base_run, instr, tmp_path, capsys):
    out = tmp_path / "prefs"
    assert main(["tune", "prefs", str(base_run), f"data.path={instr / 'prompts.jsonl'}", "prefs.max_prompts=8",
                 "--samples", "3", "--out", str(out), "--no-progress"]) == 0
    meta = json.loads((out / "meta.json").read_text())
    assert meta["prompts"] == 8 and meta["samples"] == 3 and meta["pairs"] == len((out / "train.jsonl").read_text().splitlines())
    capsys.readouterr()
    assert main(["eval", str(base_run), "--tasks", str(instr / "test.jsonl"), "--baseline", str(base_run), "--json"]) == 0
    res = json.loads(capsys.readouterr().out)
    assert res["rows"] == 40 and res["baseline"]["win_rate"] == 0.5 and res["baseline"]["ties"] == 40  # itself: all ties


def test_win_rate_hand_worked():
    w = win_rate([True, True, False, False], [False, True, True, False])
    assert w == {"win_rate": 0.5, "wins": 1, "losses": 1, "ties": 2}
    assert win_rate([True, True], [False, False])["win_rate"] == 1.0


def test_tuning_errors_are_one_line(base_run, instr, tmp_path, capsys):
    cases = [
        (["tune", "sft", str(base_run), f"out_dir={tmp_path}"], "data.path"),
        (["tune", "sft", str(base_run), f"data.path={instr / 'train.jsonl'}", "model.n_layer=3", f"out_dir={tmp_path}"], "cannot change"),
        (["tune", "dpo", str(base_run), f"data.path={instr / 'train.jsonl'}", f"out_dir={tmp_path}"], "chosen"),
        (["tune", "sft", str(base_run), f"data.path={tmp_path / 'none.jsonl'}", f"out_dir={tmp_path}"], "none.jsonl"),
        (["tune", "sft", str(base_run), f"data.path={instr / 'train.jsonl'}", "lora.rank=2", "lora.targets=q_proj", f"out_dir={tmp_path}"], "matches no linear"),
        (["tune", "prefs", str(base_run), f"data.path={instr / 'prompts.jsonl'}"], "--out"),
        (["eval", str(base_run), "--baseline", str(base_run)], "--tasks"),
    ]
    for argv, needle in cases:
        capsys.readouterr()
        assert main(argv) == 2, argv
        err = capsys.readouterr().err.strip()
        assert err.startswith("worldloom: error:") and needle in err and "\n" not in err, (argv, err)


def test_long_rows_are_refused_by_name(base_run, tmp_path):
    path = tmp_path / "long.jsonl"
    path.write_text("".join(json.dumps({"prompt": f"p{i} " + "word " * 40, "response": "r"}) + "\n" for i in range(100)))
    with pytest.raises(DataError, match="longer than the model's context"):
        tune_recipe("sft", base_run, [f"data.path={path}", *tiny_tune(tmp_path, "long")], **QUIET)


def test_a_changed_base_is_refused_when_loading(base_run, instr, tmp_path):
    base = tmp_path / "base"
    shutil.copytree(base_run, base)
    tune_recipe("sft", base, [f"data.path={instr / 'train.jsonl'}", "lora.rank=2", *tiny_tune(tmp_path, "s"), "tune.eval_rows=0"], **QUIET)
    load_run(tmp_path / "s")
    ckpt = latest_checkpoint(base) / "model.safetensors"
    from worldloom.io import save_tensors

    t = load_tensors(ckpt)
    t["norm.weight"] = t["norm.weight"] * 2
    save_tensors(ckpt, t)
    with pytest.raises(CheckpointError, match="has changed since this run was tuned"):
        load_run(tmp_path / "s")
    with pytest.raises(ConfigError, match="world run"):
        from worldloom.tune.base import tuned_config

        cfg_dir = tmp_path / "w"
        shutil.copytree(base, cfg_dir)
        text = (cfg_dir / "config.yaml").read_text().replace("recipe: text", "recipe: world")
        (cfg_dir / "config.yaml").write_text(text)
        tuned_config(cfg_dir, "sft", [], {})


def test_eval_of_a_tuned_run_reports_its_held_out_figures(base_run, prefs_file, tmp_path, capsys):
    tune_recipe("reward", base_run, [f"data.path={prefs_file}", *tiny_tune(tmp_path, "rm2")], **QUIET)
    capsys.readouterr()
    assert main(["eval", str(tmp_path / "rm2"), "--json"]) == 0
    res = json.loads(capsys.readouterr().out)
    assert res["recipe"] == "reward" and res["step"] == 4 and 0 <= res["pair_accuracy"] <= 1 and res["val_loss"] > 0
