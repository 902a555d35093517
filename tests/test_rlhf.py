"""PPO on text runs (RLHF, worldloom.tune.ppo, `worldloom tune ppo TEXT_RUN`)."""

from __future__ import annotations

import json
import shutil
import sys
import types
from pathlib import Path

import pytest
import torch

from worldloom.adapters.lora import disabled
from worldloom.checkpoint import save_checkpoint
from worldloom.cli import main
from worldloom.config import ModelConfig, save_yaml, to_dict
from worldloom.io import load_tensors
from worldloom.model import LWM
from worldloom.run import load_run
from worldloom.tune import ppo as tp
from worldloom.tune.rewards import Reward, make_reward, model_reward

WORDS = ["cat", "dog", "bird", "tree", "mat", "log"]
FAST = ["rl.batch=8", "rl.epochs=2", "rl.max_new_tokens=4", "rl.lr=0.002", "train.threads=1"]


def starts_with_a(rows, answers):
    return torch.tensor([1.0 if a.startswith("a") else 0.0 for a in answers])


TOY = Reward("toy", starts_with_a, exact=True)


def read_jsonl(path):
    return [json.loads(line) for line in Path(path).read_text().splitlines()]


@pytest.fixture(autouse=True)
def prompts_reader(monkeypatch):
    """The tests' own prompt files, read without worldloom.tune.data (another branch writes it)."""
    monkeypatch.setattr(tp, "load_prompts", read_jsonl)


@pytest.fixture
def prompts(tmp_path) -> Path:
    path = tmp_path / "prompts.jsonl"
    path.write_text("".join(json.dumps({"prompt": w, "task": "toy"}) + "\n" for w in WORDS))
    return path


def tune(source, prompts, out, *args, reward=TOY, resume=None):
    over = [] if resume else [f"data.path={prompts}", f"out_dir={out}", "name=ppo"]
    return tp.tune_text(None if resume else source, [*over, *args], resume=resume, progress=False,
                        log=lambda *a: None, reward=reward)


def metrics(run_dir: Path) -> list[dict]:
    return [{k: v for k, v in r.items() if k not in ("elapsed", "seconds")} for r in read_jsonl(run_dir / "metrics.jsonl")]


# ---------------------------------------------------------------- pure pieces


def test_token_rewards_and_gae_by_hand():
    lengths = [2, 1]
    logp, ref_logp = torch.tensor([-1.0, -2.0, -0.5]), torch.tensor([-1.5, -1.0, -0.5])
    r = tp.token_rewards(logp, ref_logp, torch.tensor([1.0, 2.0]), lengths, kl_reward=0.5)
    # -0.5 * (logp - ref) = [-0.25, 0.5, 0]; the sequence rewards 1 and 2 at the last tokens
    assert torch.allclose(r, torch.tensor([-0.25, 1.5, 2.0]))
    adv, ret = tp.response_gae(r, torch.tensor([0.5, 1.0, 0.25]), lengths, gamma=1.0, lam=0.5)
    # seq 0: δ1 = 1.5 - 1.0 = 0.5 = A1; δ0 = -0.25 + 1.0 - 0.5 = 0.25, A0 = 0.25 + 0.5·0.5 = 0.5. seq 1: A = 2 - 0.25
    assert torch.allclose(adv, torch.tensor([0.5, 0.5, 1.75]))
    assert torch.allclose(ret, torch.tensor([1.0, 1.5, 2.0]))


def test_pack_points_each_position_at_the_token_it_predicts():
    ids, pos, tok = tp.pack([[1, 2, 3], [4]], [[5, 6], [7]])
    assert ids.tolist() == [[1, 2, 3, 5, 6], [4, 7, 0, 0, 0]]
    assert tok.tolist() == [5, 6, 7]
    assert torch.equal(ids.flatten()[pos + 1], tok)  # the next position holds the response token


# ---------------------------------------------------------------- the loop


@pytest.fixture(scope="module")
def learned(trained_run, tmp_path_factory):
    """The trained tiny char model tuned for 20 updates to answer with a word starting with 'a'."""
    out = tmp_path_factory.mktemp("rlhf")
    path = out / "prompts.jsonl"
    path.write_text("".join(json.dumps({"prompt": w, "task": "toy"}) + "\n" for w in WORDS))
    mp = pytest.MonkeyPatch()
    mp.setattr(tp, "load_prompts", read_jsonl)
    try:
        result = tune(trained_run, path, out, *FAST, "rl.updates=20", f"rl.eval_path={path}")
    finally:
        mp.undo()
    return Path(result["run_dir"]), result


def test_policy_learns_the_toy_task_and_moves_away_from_the_reference(learned):
    run_dir, result = learned
    rows = metrics(run_dir)
    assert [r["update"] for r in rows] == list(range(1, 21))
    first, last = sum(r["reward"] for r in rows[:4]) / 4, sum(r["reward"] for r in rows[-4:]) / 4
    assert first < 0.2 and last > 0.6, (first, last)
    assert rows[0]["kl"] == 0.0 and rows[0]["kl_seq"] == 0.0  # the sampling policy is the reference itself
    assert rows[-1]["kl"] > 0.01 and rows[-1]["kl_seq"] > rows[-1]["kl"]
    assert all(k in rows[-1] for k in ("accuracy", "entropy", "clipfrac", "approx_kl", "length", "stopped"))
    ev = json.loads((run_dir / "eval.json").read_text())
    assert ev == result["eval"] and ev["rows"] == len(WORDS) and 0.0 <= ev["accuracy"] <= 1.0


def test_a_tuned_run_is_a_run_folder(learned, trained_run):
    run_dir, _ = learned
    run = load_run(run_dir)
    assert run.state["step"] == 20 and run.cfg.tune.base == str(trained_run.resolve())
    assert (run.checkpoint / "value.safetensors").is_file()
    base = load_run(trained_run)
    changed = [k for k, v in run.model.state_dict().items() if not torch.equal(v, base.model.state_dict()[k])]
    assert changed, "full fine-tuning should have moved the weights"
    assert main(["generate", str(run_dir), "Q: cat\nA: ", "--max-new-tokens", "3", "--temperature", "0"]) == 0


def test_lora_policy_references_its_disabled_self_and_trains_only_adapters(trained_run, prompts, tmp_path):
    tu = tp.start_text(trained_run, [f"data.path={prompts}", f"out_dir={tmp_path}", "name=ppo", "lora.rank=2", *FAST],
                       TOY, log=lambda *a: None)
    assert tu.reference.copy is None  # no second model: the reference is the policy with its adapters off
    trained = {n for n, p in tu.model.named_parameters() if p.requires_grad}
    assert trained and all(".adapters." in n for n in trained)
    opt_params = {id(p) for g in tu.opt.param_groups for p in g["params"]}
    assert opt_params == {id(p) for p in tu.model.parameters() if p.requires_grad} | {id(p) for p in tu.value_head.parameters()}
    frozen = {n: p.detach().clone() for n, p in tu.model.named_parameters() if not p.requires_grad}
    tu.cfg.updates = 3
    tu.cfg.value_warmup = 0
    for _ in range(3):
        tp.one_update(tu)
    assert all(torch.equal(p, frozen[n]) for n, p in tu.model.named_parameters() if n in frozen)
    ids, pos, _ = tp.pack([tu.prompt_ids[0]], [[5, 6]])
    with disabled(tu.model):
        off = tp.policy_terms(tu.model, ids, pos)[0]
    base = load_run(trained_run).model
    assert torch.allclose(tu.reference.logits(ids, pos), off)
    assert torch.allclose(off, tp.policy_terms(base, ids, pos)[0], atol=1e-5)  # the disabled policy is the base
    tp.save(tu)
    saved = load_tensors(tu.run_dir / "checkpoints" / "step-00000003" / "model.safetensors")
    assert saved and all(".adapters." in k for k in saved)  # a LoRA run's checkpoint holds its adapters only


@pytest.mark.parametrize("lora", [False, True])
def test_resumed_after_a_kill_reproduces_the_uninterrupted_run(trained_run, prompts, tmp_path, monkeypatch, lora):
    extra = [*FAST, "rl.updates=3", *(["lora.rank=2"] if lora else [])]
    tune(trained_run, prompts, tmp_path / "a", *extra)
    real, calls = tp.rollout, []

    def dies_in_update_three(*a, **k):
        calls.append(1)
        if len(calls) == 3:
            raise RuntimeError("killed")
        return real(*a, **k)

    monkeypatch.setattr(tp, "rollout", dies_in_update_three)
    with pytest.raises(RuntimeError, match="killed"):
        tune(trained_run, prompts, tmp_path / "b", *extra)
    monkeypatch.setattr(tp, "rollout", real)
    b = tmp_path / "b" / "ppo"
    assert load_run(b).state["step"] == 2 and len(metrics(b)) == 2
    tune(None, None, None, resume=b)
    a = tmp_path / "a" / "ppo"
    assert metrics(a) == metrics(b)
    wa, wb = load_run(a).model.state_dict(), load_run(b).model.state_dict()
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
    va = load_tensors(load_run(a).checkpoint / "value.safetensors")
    vb = load_tensors(load_run(b).checkpoint / "value.safetensors")
    assert all(torch.equal(va[k], vb[k]) for k in va)


# ---------------------------------------------------------------- rewards


@pytest.fixture
def reward_run(trained_run, tmp_path) -> Path:
    """A reward model made by hand: the trained run with a (random) value head, saved as a run folder."""
    src = load_run(trained_run)
    rm = tmp_path / "rm"
    shutil.copytree(trained_run, rm)
    cfg = to_dict(src.cfg)
    cfg["model"]["value_head"] = True
    cfg["name"] = "rm"
    save_yaml(cfg, rm / "config.yaml")
    torch.manual_seed(1)
    model = LWM(ModelConfig(**cfg["model"]))
    model.load_state_dict(src.model.state_dict(), strict=False)
    torch.nn.init.normal_(model.value.weight, std=1.0)
    save_checkpoint(rm, model, None, {"step": 1, "elapsed": 0.0})
    return rm


def test_reward_model_scores_the_last_token_of_prompt_answer_and_stop(reward_run, trained_run, prompts, tmp_path):
    reward = model_reward(reward_run)
    rows, answers = [{"prompt": "cat"}, {"prompt": "bird"}], ["a dog", "the"]
    got = reward.score(rows, answers)
    rm = load_run(reward_run)
    for i, (row, ans) in enumerate(zip(rows, answers)):
        ids = rm.tokenizer.encode(f"Q: {row['prompt']}\nA: {ans}\n")[None]
        assert torch.allclose(got[i], rm.model(ids).values[0, -1], atol=1e-5)
    assert got[0] != got[1] and not reward.exact
    assert main(["tune", "ppo", str(trained_run), f"data.path={prompts}", f"reward={reward_run}", *FAST,
                 "rl.updates=2", f"out_dir={tmp_path}", "name=ppo", "--no-progress"]) == 0
    rows = metrics(tmp_path / "ppo")
    assert len(rows) == 2 and "accuracy" not in rows[0]
    assert (tmp_path / "ppo" / "rl.yaml").read_text().count(str(reward_run)) == 1
    # more updates on the command line: the run goes on with the reward model it was started with
    assert main(["tune", "ppo", "--resume", str(tmp_path / "ppo"), "rl.updates=3", "--no-progress"]) == 0
    assert [r["update"] for r in metrics(tmp_path / "ppo")] == [1, 2, 3]


def test_wall_clock_budget_stops_the_run(trained_run, prompts, tmp_path):
    result = tune(trained_run, prompts, tmp_path, *FAST, "rl.updates=50", "rl.max_minutes=0.000001")
    assert result["updates"] == 1 and load_run(tmp_path / "ppo").state["step"] == 1


def test_checker_reward_asks_the_task_checker(monkeypatch):
    fake = types.ModuleType("worldloom.tune.tasks")
    fake.check = lambda row, answer: answer == row["answer"]
    monkeypatch.setitem(sys.modules, "worldloom.tune.tasks", fake)
    reward = make_reward("checker")
    assert reward.exact
    assert reward.score([{"answer": "4"}, {"answer": "5"}], ["4", "6"]).tolist() == [1.0, 0.0]


# ---------------------------------------------------------------- bad input


@pytest.mark.parametrize("case, message", [
    ("no reward", "needs a reward"),
    ("unknown reward", "neither 'checker' nor a run folder"),
    ("no value head", "not a reward model"),
    ("missing prompts", "no such file"),
    ("too long", "more than the model's context"),
    ("bad rl key", "rl.clipp"),
    ("model key", "cannot change when tuning"),
])
def test_bad_input_is_one_line(trained_run, prompts, tmp_path, capsys, case, message):
    args = {"no reward": [], "unknown reward": ["reward=nonsense"], "no value head": [f"reward={trained_run}"],
            "missing prompts": ["reward=checker", f"data.path={tmp_path / 'nope.jsonl'}"],
            "too long": ["reward=checker", "rl.max_new_tokens=30"], "bad rl key": ["reward=checker", "rl.clipp=1"],
            "model key": ["reward=checker", "model.n_layer=3"]}[case]
    data = [] if case == "missing prompts" else [f"data.path={prompts}"]
    assert main(["tune", "ppo", str(trained_run), *data, *FAST, *args, f"out_dir={tmp_path}", "--no-progress"]) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and err.startswith("worldloom: error:") and len(err.splitlines()) == 1, err
    assert not (tmp_path / "trained-ppo").exists()  # nothing is written before the input is checked


def test_resume_refuses_other_keys_and_other_folders(trained_run, tmp_path, capsys):
    assert main(["tune", "ppo", "--resume", str(trained_run), "--no-progress"]) == 2
    assert "not an RL run folder" in capsys.readouterr().err
    assert main(["tune", "ppo", "--resume", str(trained_run), "name=other", "--no-progress"]) == 2
    assert "fixed once a run exists" in capsys.readouterr().err


def test_group_baseline_is_leave_one_out():
    from worldloom.tune.ppo import group_baseline

    s = torch.tensor([1.0, 0.0, 0.0, 1.0, 1.0, 1.0])
    assert torch.allclose(group_baseline(s, 3), torch.tensor([1.0, -0.5, -0.5, 0.0, 0.0, 0.0]))
    assert torch.equal(group_baseline(s, 1), s)


def test_group_must_divide_the_batch():
    from worldloom.errors import ConfigError
    from worldloom.tune.ppo import TextRLConfig

    with pytest.raises(ConfigError, match="rl.group"):
        TextRLConfig(batch=10, group=4)
    assert TextRLConfig(batch=12, group=4).group == 4
