"""In-context learning: the ICL data's rules and split, the prompt builder, the scorer, `eval --icl`."""

from __future__ import annotations

import itertools
import json
import random
import string

import pytest

from worldloom.cli import main
from worldloom.errors import ConfigError, DataError
from worldloom.tune.icl import icl_curve, icl_prompt, is_right, parse_shots, plan, read_icl
from worldloom.tune.icl_tasks import (FORMAT, HELD_OUT, PRIMITIVES, TEST_KINDS, TRAIN_KINDS, episode, family_name,
                                      make_icl)

FMT, STOP = "Q: {prompt}\nA: ", "\n"
TINY = ["model.n_layer=1", "model.d_model=32", "model.n_head=2", "model.context=128", "train.max_steps=2",
        "train.eval_interval=2", "train.eval_batches=1", "train.batch_size=2", "train.precision=fp32", "train.threads=1"]


# ---------------------------------------------------------------- an independent reading of a family name

def _rule(step: str, word: str) -> str:
    """One step, written again from the docs (loops, not the generator's slices)."""
    name, _, arg = step.partition(":")
    if name == "reverse":
        return "".join(word[i] for i in range(len(word) - 1, -1, -1))
    if name == "rotate":
        return "".join(word[(i + int(arg)) % len(word)] for i in range(len(word)))
    if name == "suffix":
        return word + arg
    if name == "prefix":
        return arg + word
    if name == "evens":
        return "".join(c for i, c in enumerate(word) if i % 2 == 0)
    if name == "double":
        return "".join(c * 2 for c in word)
    raise AssertionError(f"unknown step {step}")


def _solve(family: str, word: str) -> str:
    for step in family.split(">"):
        word = _rule(step, word)
    return word


@pytest.fixture(scope="module")
def icl_data(tmp_path_factory):
    out = tmp_path_factory.mktemp("icl") / "data"
    make_icl(out, n=300, per_kind=3, rows=12, seed=1)
    return out


def _jsonl(path):
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


# ---------------------------------------------------------------- the data


def test_every_answer_follows_its_family_rule(icl_data):
    rows = _jsonl(icl_data / "test.jsonl") + _jsonl(icl_data / "seen.jsonl")
    assert len(rows) > 100
    for r in rows:
        assert r["response"] == _solve(r["family"], r["prompt"]), r
        assert r["kind"] == ">".join(s.split(":")[0] for s in r["family"].split(">"))
    # training episodes too: every Q/A pair of an episode follows one rule of a training kind
    for ep in (icl_data / "train.txt").read_text().split("\n\n")[:200]:
        pairs = [line.split("=") for line in ep.splitlines()]
        assert pairs and any(all(_solve(f, q) == a for q, a in pairs) for f in _families(TRAIN_KINDS)), ep


def _families(kinds):
    """Every family of these kinds (every parameter value)."""
    for kind in kinds:
        for params in itertools.product(*(PRIMITIVES[p].params for p in kind)):
            yield family_name(list(zip(kind, params)))


def test_no_training_rule_computes_a_test_family(icl_data):
    test = _jsonl(icl_data / "test.jsonl")
    by: dict[str, list[dict]] = {}
    for r in test:
        by.setdefault(r["family"], []).append(r)
    assert len(by) >= len(TEST_KINDS)
    train_families = list(_families(TRAIN_KINDS))
    for fam, rows in by.items():
        same = [f for f in train_families if all(_solve(f, r["prompt"]) == r["response"] for r in rows)]
        assert not same, f"{fam} is computed by training rules {same[:3]}"
    # and structurally: no test kind's pair of primitives is a training kind, in either order
    held = {frozenset(p) for p in HELD_OUT}
    assert {r["kind"] for r in test} == {">".join(k) for k in TEST_KINDS}
    assert all(frozenset(k) not in held for k in TRAIN_KINDS if len(k) == 2)
    assert set((icl_data / "train.txt").read_text()) == set(string.ascii_lowercase + "=\n")


def test_the_preset_reads_examples_as_the_data_writes_them():
    from worldloom.config import build_config

    tune = build_config("icl", []).tune
    assert (tune.prompt_format, tune.stop) == (FORMAT, "\n") == ("{prompt}=", "\n")


def test_episode_is_one_family(icl_data):
    rng = random.Random(3)
    ep = episode(("rotate", "suffix"), 5, rng)
    lines = ep.rstrip("\n").split("\n")
    assert ep.endswith("\n\n") and len(lines) == 5
    pairs = [line.split("=") for line in lines]
    assert [f for f in _families([("rotate", "suffix")]) if all(_solve(f, q) == a for q, a in pairs)]


def test_make_icl_refuses_a_foreign_folder(tmp_path):
    (tmp_path / "x.txt").write_text("mine")
    with pytest.raises(DataError, match="not a `worldloom data icl` output"):
        make_icl(tmp_path, n=5)


# ---------------------------------------------------------------- the prompt builder and scorer


def _rows(n_fam=3, n=10):
    return {f"f{i}": [{"family": f"f{i}", "prompt": f"p{i}x{j}", "response": f"r{i}x{j}"} for j in range(n)]
            for i in range(n_fam)}


def test_plan_draws_examples_of_the_same_family_never_the_query():
    by = _rows()
    queries = plan(by, 8, 9, seed=0)
    assert len(queries) == 9 and {q.row["family"] for q in queries} == {"f0", "f1", "f2"}
    for q in queries:
        assert len(q.examples) == 8
        assert all(e["family"] == q.row["family"] and e["prompt"] != q.row["prompt"] for e in q.examples)
        assert len({e["prompt"] for e in q.examples}) == 8
    assert plan(by, 8, 9, seed=0) == queries  # deterministic
    assert plan(by, 8, 9, seed=1) != queries


def test_prompt_for_k_shots_is_the_first_k_examples_then_the_query():
    q = plan(_rows(), 4, 1, seed=0)[0]
    assert icl_prompt(q, 0, FMT, STOP) == f"Q: {q.row['prompt']}\nA: "
    two = icl_prompt(q, 2, FMT, STOP)
    e0, e1 = q.examples[:2]
    assert two == f"Q: {e0['prompt']}\nA: {e0['response']}\nQ: {e1['prompt']}\nA: {e1['response']}\nQ: {q.row['prompt']}\nA: "
    assert icl_prompt(q, 4, FMT, STOP).startswith(two[: -len(f"Q: {q.row['prompt']}\nA: ")])


def test_plan_refuses_too_few_rows():
    with pytest.raises(DataError, match="8 shots need 9 rows per family"):
        plan(_rows(n=8), 8, 5)


@pytest.mark.parametrize("text", ["0,1,x", "", "-1,2", "0,65", "1.5"])
def test_bad_shots(text):
    with pytest.raises(ConfigError, match="--shots"):
        parse_shots(text)


def test_shots_parsed_sorted_unique():
    assert parse_shots("8,0,4,1,4") == [0, 1, 4, 8]


def _last_answer_copier(texts: list[str]) -> list[str]:
    """A fake model: answers with the last example's answer (nothing with no example)."""
    out = []
    for t in texts:
        answers = [line[3:] for line in t.split("\n") if line.startswith("A: ") and line != "A: "]
        out.append(answers[-1] if answers else "")
    return out


def test_a_copying_answerer_scores_what_it_should():
    # family f0: every response is "same"; f1: all different. Copying the last example is right
    # exactly on f0 rows when k >= 1, and never with k = 0.
    by = {"f0": [{"family": "f0", "prompt": f"a{j}", "response": "same"} for j in range(6)],
          "f1": [{"family": "f1", "prompt": f"b{j}", "response": f"r{j}"} for j in range(6)]}
    queries = plan(by, 2, 10, seed=0)
    res = icl_curve(queries, [0, 1, 2], _last_answer_copier, FMT, STOP)
    assert res["accuracy"] == {"0": 0.0, "1": 0.5, "2": 0.5}
    assert res["per_family"] == {"f0": {"0": 0.0, "1": 1.0, "2": 1.0}, "f1": {"0": 0.0, "1": 0.0, "2": 0.0}}
    assert res["queries"] == 10 and res["families"] == 2


def test_instruct_rows_use_their_checker():
    row = {"task": "arith", "prompt": "2+3=?", "response": "5"}
    assert is_right(row, " 5 ") and not is_right(row, "6")
    assert is_right({"family": "x", "prompt": "p", "response": "Ab"}, "Ab") and not is_right({"family": "x", "prompt": "p", "response": "Ab"}, "ab")


def test_read_icl_needs_a_family(tmp_path):
    f = tmp_path / "t.jsonl"
    f.write_text('{"prompt": "a", "response": "b"}\n{"family": "x", "prompt": "c", "response": "d"}\n')
    with pytest.raises(DataError, match=r"t.jsonl:1: no family"):
        read_icl(f, FMT, STOP)
    f.write_text('{"family": "x", "prompt": "c", "response": "d"}\n{"family": "y", "prompt": "c", "response": "e"}\n')
    assert {k: len(v) for k, v in read_icl(f, FMT, STOP).items()} == {"x": 1, "y": 1}  # a prompt may recur across families
    f.write_text('{"family": "x", "prompt": "c", "response": "d\\ne"}\n')
    with pytest.raises(DataError, match="t.jsonl:1: the response contains the stop string"):
        read_icl(f, FMT, STOP)


# ---------------------------------------------------------------- the CLI on a tiny run


@pytest.fixture(scope="module")
def icl_run(tmp_path_factory, icl_data):
    out = tmp_path_factory.mktemp("iclrun")
    assert main(["train", "icl", *TINY, f"data.path={icl_data / 'train.txt'}", f"out_dir={out}", "name=r", "--no-progress"]) == 0
    return out / "r"


def test_eval_icl_json(icl_run, icl_data, capsys):
    capsys.readouterr()
    assert main(["eval", str(icl_run), "--icl", str(icl_data / "test.jsonl"), "--shots", "4,0,1", "--queries", "12",
                 "--json", "--batch-size", "64"]) == 0
    res = json.loads(capsys.readouterr().out)
    assert res["shots"] == [0, 1, 4] and set(res["accuracy"]) == {"0", "1", "4"}
    assert all(0.0 <= a <= 1.0 for a in res["accuracy"].values())
    assert res["queries"] == 12 and res["families"] == min(12, len({r["family"] for r in _jsonl(icl_data / "test.jsonl")}))
    assert set(res["per_kind"]) <= {">".join(k) for k in TEST_KINDS}
    assert all(set(v) == {"0", "1", "4"} for v in res["per_family"].values())
    assert res["over_context"]["0"] == 0


def test_eval_icl_table_and_errors(icl_run, icl_data, capsys):
    capsys.readouterr()
    assert main(["eval", str(icl_run), "--icl", str(icl_data / "test.jsonl"), "--shots", "0,1", "--queries", "4"]) == 0
    out = capsys.readouterr().out
    assert "0 shots" in out and "1 shots" in out and "\nall " in out
    for argv, needle in ((["--shots", "0,x"], "--shots"), (["--shots", "0,20"], "20 shots need 21 rows"),
                         (["--tasks", str(icl_data / "test.jsonl")], "--icl")):
        assert main(["eval", str(icl_run), "--icl", str(icl_data / "test.jsonl"), *argv]) == 2
        err = capsys.readouterr().err
        assert err.startswith("worldloom: error:") and needle in err and err.count("\n") == 1, err


def test_eval_icl_reads_an_instruct_test_file(icl_run, tmp_path, capsys):
    from worldloom.tune.tasks import make_instruct

    make_instruct(["arith", "reverse"], 40, tmp_path / "instr", test_n=24)
    capsys.readouterr()
    assert main(["eval", str(icl_run), "--icl", str(tmp_path / "instr" / "test.jsonl"), "--shots", "0,2", "--queries", "6",
                 "--json", "--batch-size", "64"]) == 0
    res = json.loads(capsys.readouterr().out)
    assert set(res["per_family"]) == {"arith", "reverse"} and res["per_kind"] == {} and res["queries"] == 6
