"""Synthetic instruction tasks (worldloom.tune.tasks), the JSONL readers (worldloom.tune.data)
and `worldloom data instruct`."""

from __future__ import annotations

import builtins
import json
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from worldloom.cli import main
from worldloom.errors import ConfigError
from worldloom.tune.data import (PROMPT_FORMAT, STOP, DataError, read_instructions, read_preferences, read_prompts,
                                 render_prompt)
from worldloom.tune.tasks import (FAMILIES, MARKER, answer_of, babyai_view, check, family_rows, is_test_prompt,
                                  make_instruct)

# ---------------------------------------------------------------- task families


@pytest.fixture(scope="module")
def generated() -> dict[str, tuple[list[dict], list[dict]]]:
    return {task: family_rows(task, 150, 30, seed=3) for task in FAMILIES}


def _wrong(answer: str) -> str:
    """A different answer of the same shape."""
    if answer.lstrip("-").isdigit():
        return str(int(answer) + 1)
    return answer[1:] + answer[0] if len(set(answer)) > 1 else answer + "x"


@pytest.mark.parametrize("task", list(FAMILIES))
def test_generated_rows_pass_their_checker_and_wrong_answers_fail(generated, task):
    train, test = generated[task]
    assert (len(train), len(test)) == (150, 30)
    for row in train + test:
        assert row["task"] == task
        assert check(row, row["response"]), row  # the generator's own answer == the parsed one
        assert check(row, f"  {row['response']}\n")  # surrounding whitespace ignored
        assert not check(row, _wrong(row["response"])), row
        assert not check(row, "")
        assert len(row["response"]) <= 8 and len(row["prompt"]) <= 300
    assert len({r["prompt"] for r in train}) == len(train)  # distinct within a split


@pytest.mark.parametrize("task, prompt, answer", [
    ("arith", "23+58=?", "81"), ("arith", "what is 71-9?", "62"), ("arith", "7*8=?", "56"), ("arith", "3-45=?", "-42"),
    ("reverse", "reverse: abcd", "dcba"), ("reverse", "reverse the letters of xyz", "zyx"),
    ("sort", "sort: 5291", "1259"), ("sort", "sort ascending: dcab", "abcd"),
    ("count", 'how many "a" in "banana"?', "3"), ("count", "count the letter z in banana", "0"),
    ("babyai", "you see: a red key 2 left 1 ahead, a blue ball 3 ahead. which colour is the key?", "red"),
    ("babyai", "you see: a red key 2 left 1 ahead, a blue ball 3 ahead, a grey ball 1 right. how many balls do you see?", "2"),
    ("babyai", "you see: a red key 2 left 1 ahead, a blue ball 3 ahead. what is at 3 ahead?", "ball"),
    ("babyai", "you see: a red key 2 left 1 ahead, a blue ball 3 ahead. how far ahead is the red key?", "1"),
    ("babyai", "you see: nothing. how many keys do you see?", "0"),
])
def test_answer_of_hand_worked(task, prompt, answer):
    assert answer_of(task, prompt) == answer
    assert check({"task": task, "prompt": prompt}, answer.upper())  # any case


@pytest.mark.parametrize("task, prompt", [
    ("babyai", "you see: a red key 1 ahead, a green key 2 ahead. which colour is the key?"),  # two keys: no answer
    ("babyai", "you see: a red key 1 ahead. what is at 2 ahead?"),
    ("babyai", "you see: a pink key 1 ahead. how many keys do you see?"),  # not a MiniGrid colour
    ("arith", "23/58=?"), ("reverse", "reverse: ABC"), ("sort", "sort: a1b"), ("count", "how many a in banana?"),
])
def test_unanswerable_prompts_are_refused(task, prompt):
    with pytest.raises(DataError, match=f"not a {task} prompt"):
        answer_of(task, prompt)
    assert not check({"task": task, "prompt": prompt}, "red")


def test_prompts_are_parsed_never_evaluated(monkeypatch):
    def boom(*a, **k):
        raise AssertionError("evaluated")

    monkeypatch.setattr(builtins, "eval", boom)
    monkeypatch.setattr(builtins, "exec", boom)
    monkeypatch.setattr(builtins, "__import__", boom)  # imports inside answer_of would hit this too
    for task, prompt in [("arith", "__import__('os').system('touch pwned')+1=?"), ("arith", "what is 1+1 or __import__('os')?"),
                         ("sort", "sort: __import__"), ("babyai", "you see: __import__('os'). how many keys do you see?")]:
        assert not check({"task": task, "prompt": prompt}, "2")
    assert check({"task": "arith", "prompt": "1+1=?"}, "2")
    assert not Path("pwned").exists()


def test_unknown_task_names_the_families():
    with pytest.raises(ConfigError, match=r"unknown task 'arth'; did you mean 'arith'\?.*arith, reverse, sort, count, babyai"):
        answer_of("arth", "1+1=?")
    with pytest.raises(ConfigError):
        check({"task": "nope", "prompt": "1+1=?"}, "2")


def test_babyai_view_matches_the_world():
    """Each described object is the grid's object at agent + ahead·dir_vec + right·right_vec."""
    from worldloom.tune.tasks import _babyai_env

    env = _babyai_env()[0].unwrapped
    total = 0
    for seed in range(40):
        seen = babyai_view(seed)
        for s in seen:
            ahead, right = s.ahead, 0
            for word, sign in (("left", -1), ("right", 1)):
                if word in s.where:
                    right = sign * int(s.where.split(f" {word}")[0])
            x, y = env.agent_pos + ahead * env.dir_vec + right * env.right_vec
            cell = env.grid.get(int(x), int(y))
            assert (cell.color, cell.type) == (s.colour, s.kind), (seed, s)
            total += 1
    assert total > 40  # the views are not empty


@given(task=st.sampled_from(list(FAMILIES)), prompt=st.text(max_size=80), answer=st.text(max_size=10))
def test_checkers_take_any_text(task, prompt, answer):
    assert check({"task": task, "prompt": prompt}, answer) in (True, False)


# ---------------------------------------------------------------- make_instruct


def _jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


@pytest.fixture(scope="module")
def instr(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("instr") / "d"
    make_instruct(list(FAMILIES), 400, out, seed=5)
    return out


def test_make_instruct_files_counts_and_split(instr):
    meta = json.loads((instr / "meta.json").read_text())
    train, test, prompts = (_jsonl(instr / f) for f in ("train.jsonl", "test.jsonl", "prompts.jsonl"))
    assert meta[MARKER] and meta["seed"] == 5 and meta["format"] == PROMPT_FORMAT
    assert meta["rows"] == {"train": 400, "test": 100, "prompts": 400}
    for name, rows in (("train", train), ("test", test), ("prompts", prompts)):
        counts = {t: sum(r["task"] == t for r in rows) for t in FAMILIES}
        assert meta["counts"][name] == counts
        assert max(counts.values()) - min(counts.values()) <= 1  # mixed evenly
    test_prompts = {r["prompt"] for r in test}
    assert all(is_test_prompt(p) for p in test_prompts) and not any(is_test_prompt(r["prompt"]) for r in train)
    assert not test_prompts & {r["prompt"] for r in train} and not test_prompts & {r["prompt"] for r in prompts}
    pretrain = (instr / "pretrain.txt").read_text()
    blocks = pretrain.split("\n\n")[:-1]
    assert len(blocks) == len(train)
    for block in blocks:
        prompt, answer = block.removeprefix("Q: ").split("\nA: ")
        assert prompt not in test_prompts
        assert check({"task": next(t for t in FAMILIES if _answers(t, prompt)), "prompt": prompt}, answer)
    assert all(check(r, r["response"]) for r in train + test)


def _answers(task: str, prompt: str) -> bool:
    try:
        answer_of(task, prompt)
        return True
    except DataError:
        return False


def test_make_instruct_is_deterministic_and_reruns_in_place(instr, tmp_path):
    again = tmp_path / "again"
    make_instruct(list(FAMILIES), 400, again, seed=5)
    names = ("train.jsonl", "test.jsonl", "prompts.jsonl", "pretrain.txt", "meta.json")
    assert all((again / f).read_bytes() == (instr / f).read_bytes() for f in names)
    make_instruct(["arith", "sort"], 50, again, seed=6, test_n=10)  # an earlier output may be overwritten
    assert (again / "train.jsonl").read_bytes() != (instr / "train.jsonl").read_bytes()
    assert json.loads((again / "meta.json").read_text())["counts"]["test"] == {"arith": 5, "sort": 5}


def test_make_instruct_refuses(tmp_path):
    (tmp_path / "mine.txt").write_text("keep me")
    with pytest.raises(DataError, match="not a `worldloom data instruct` output"):
        make_instruct(["arith"], 10, tmp_path)
    assert (tmp_path / "mine.txt").read_text() == "keep me"
    with pytest.raises(ConfigError, match="did you mean 'reverse'"):
        make_instruct(["revers"], 10, tmp_path / "new")
    with pytest.raises(ConfigError, match="n must be a positive integer"):
        make_instruct(["arith"], 0, tmp_path / "new")
    assert not (tmp_path / "new").exists()


# ---------------------------------------------------------------- readers


def _file(tmp_path: Path, lines: list, name: str = "rows.jsonl") -> Path:
    path = tmp_path / name
    path.write_bytes(b"\n".join(x if isinstance(x, bytes) else (x if isinstance(x, str) else json.dumps(x)).encode()
                                for x in lines) + b"\n")
    return path


def _error(fn, path: Path, **kw) -> str:
    with pytest.raises(DataError) as e:
        fn(path, **kw)
    message = str(e.value)
    assert "\n" not in message
    return message


ROW = {"prompt": "2+2=?", "response": "4"}
INSTRUCTION_ERRORS = [
    ([{"prompt": "2+2=?"}], 1, 'missing key "response"'),
    ([ROW, {"prompt": 5, "response": "x"}], 2, '"prompt" is a number, expected a string'),
    ([{"prompt": "a", "response": " \t"}], 1, '"response" is empty'),
    ([{"prompt": "", "response": "x"}], 1, '"prompt" is empty'),
    ([ROW, '{"prompt": "a", '], 2, "not JSON"),
    (["[1, 2]"], 1, "a JSON array, expected an object"),
    ([ROW, "", {"prompt": "a", "response": "b", "task": 3}], 3, '"task" is a number'),  # blank line 2 skipped
    ([ROW, {"prompt": "3+3=?", "response": "6"}, {"prompt": "2+2=?", "response": "5"}], 3,
     "the same prompt as line 1 with a different response"),
    ([{"prompt": "a", "response": "line one\nline two"}], 1, "contains the stop string"),
    ([ROW, b'{"prompt": "caf\xe9", "response": "x"}'], 2, "not UTF-8 text (byte 0xe9"),
    ([{"messages": [{"role": "user", "content": "hi"}]}], 1, "the last message is the user's"),
    ([{"messages": [{"role": "bot", "content": "hi"}]}], 1, "messages[0]: \"role\" is 'bot'"),
    ([{"messages": []}], 1, '"messages" is empty'),
    ([{"messages": [{"role": "assistant", "content": "hi"}]}], 1, "no user message"),
    ([{"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}], "prompt": "c"}], 1,
     "not both"),
]


@pytest.mark.parametrize("lines, line, fragment", INSTRUCTION_ERRORS)
def test_instruction_errors_name_file_and_line(tmp_path, lines, line, fragment):
    path = _file(tmp_path, lines)
    message = _error(read_instructions, path)
    assert message.startswith(f"{path}:{line}: "), message
    assert fragment in message, message


def test_instruction_over_long_row(tmp_path):
    path = _file(tmp_path, [ROW, {"prompt": "a" * 6, "response": "b" * 5}])
    read_instructions(path, max_chars=11)
    message = _error(read_instructions, path, max_chars=10)
    assert message.startswith(f"{path}:2: the row is 11 characters (prompt + response), over the limit of 10")


def test_file_level_errors(tmp_path):
    for fn in (read_instructions, read_preferences, read_prompts):
        assert _error(fn, tmp_path / "nope.jsonl") == f"{tmp_path / 'nope.jsonl'}: no such file"
        empty = _file(tmp_path, ["", "  "], "empty.jsonl")
        assert _error(fn, empty).startswith(f"{empty}: no rows")


def test_instructions_read_and_keep_keys(tmp_path):
    rows = [dict(ROW, task="arith", source="hand"), ROW, {"prompt": "x", "response": "y"}]  # the same row twice is fine
    out = read_instructions(_file(tmp_path, rows))
    assert out == rows and not any("rendered" in r for r in out)


def test_chat_rows_are_rendered(tmp_path):
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "1+1=?"},
                {"role": "assistant", "content": "2"}, {"role": "user", "content": "and 2+2?"},
                {"role": "assistant", "content": "4"}]
    path = _file(tmp_path, [{"messages": messages, "task": "arith"}, {"messages": messages[1:3]}])
    first, second = read_instructions(path)
    assert first["prompt"] == "Be brief.\nQ: 1+1=?\nA: 2\nQ: and 2+2?\nA: "
    assert (first["response"], first["rendered"], first["task"]) == ("4", True, "arith")
    assert second["prompt"] == render_prompt("1+1=?") and second["response"] == "2"
    custom = read_instructions(path, fmt="<user>{prompt}</user>", stop="<end>")[0]
    assert custom["prompt"] == "Be brief.\n<user>1+1=?</user>2<end><user>and 2+2?</user>"
    with pytest.raises(ConfigError, match=r"\{prompt\}"):
        read_instructions(path, fmt="Q: A: ")


PREF = {"prompt": "2+2=?", "chosen": "4", "rejected": "5"}


@pytest.mark.parametrize("lines, line, fragment", [
    ([{"prompt": "a", "chosen": "b"}], 1, 'missing key "rejected"'),
    ([PREF, {"prompt": "a", "chosen": "b", "rejected": "b"}], 2, '"chosen" and "rejected" are the same text'),
    ([PREF, {"prompt": "a", "chosen": ["b"], "rejected": "c"}], 2, '"chosen" is a array'),
    ([PREF, dict(PREF, chosen="6")], None, None),  # another chosen/rejected pair for the same prompt is fine
    ([PREF, {"prompt": "3+3=?", "chosen": "6", "rejected": "4"}, dict(PREF, chosen="5", rejected="3")], 3,
     '"chosen" is the "rejected" of line 1 for the same prompt'),
    ([PREF, dict(PREF, chosen="7", rejected="4")], 2, '"rejected" is the "chosen" of line 1'),
    ([dict(PREF, margin="big")], 1, '"margin" is a string, expected a number'),
    (["null"], 1, "a JSON null, expected an object"),
])
def test_preference_errors(tmp_path, lines, line, fragment):
    path = _file(tmp_path, lines)
    if line is None:
        assert len(read_preferences(path)) == len(lines)
        return
    message = _error(read_preferences, path)
    assert message.startswith(f"{path}:{line}: ") and fragment in message, message


def test_preferences_read_with_margin_and_length(tmp_path):
    rows = [dict(PREF, task="arith", margin=1.0, extra=[1])]
    path = _file(tmp_path, rows)
    assert read_preferences(path) == rows
    message = _error(read_preferences, _file(tmp_path, [dict(PREF, chosen="4" * 20, rejected="5")]), max_chars=20)
    assert "25 characters (prompt + longest answer)" in message
    assert "expected a finite number" in _error(read_preferences, _file(tmp_path, ['{"prompt": "a", "chosen": "b", "rejected": "c", "margin": NaN}']))


def test_prompt_files(tmp_path, instr):
    rows = read_prompts(instr / "test.jsonl")  # instruction files are prompt files too: keys kept
    assert len(rows) == 100 and all({"task", "prompt", "response"} <= set(r) for r in rows)
    assert len(read_prompts(instr / "prompts.jsonl")) == 400
    assert len(read_instructions(instr / "train.jsonl")) == 400
    path = _file(tmp_path, [{"prompt": "a"}, {"response": "b"}])
    assert _error(read_prompts, path).startswith(f'{path}:2: missing key "prompt"')
    assert "over the limit of 3" in _error(read_prompts, _file(tmp_path, [{"prompt": "abcd"}]), max_chars=3)
    assert STOP == "\n" and render_prompt("x") == "Q: x\nA: "


@given(lines=st.lists(st.one_of(st.binary(max_size=30), st.sampled_from(
    [b'{"prompt": "a", "response": "b"}', b'{"prompt": "a", "chosen": "b", "rejected": "c"}', b'{"messages": [1]}',
     b'{"prompt": {"x": 1}}', b"[[[[[[", b"1e999", b'"\\ud800"', b'{"messages": [{"role": "user"}]}'])), max_size=6))
def test_readers_fail_only_with_data_errors(tmp_path_factory, lines):
    path = tmp_path_factory.mktemp("hostile") / "rows.jsonl"
    path.write_bytes(b"\n".join(lines))
    for fn in (read_instructions, read_preferences, read_prompts):
        try:
            assert all(isinstance(r, dict) and isinstance(r["prompt"], str) for r in fn(path))
        except DataError as e:
            assert "\n" not in str(e) and str(e).startswith(str(path))


# ---------------------------------------------------------------- CLI


def test_cli_data_instruct(tmp_path, capsys):
    out = tmp_path / "instr"
    assert main(["data", "instruct", "--n", "200", "--out", str(out), "--no-progress"]) == 0
    printed = capsys.readouterr().out.strip()
    assert len(printed.splitlines()) == 1 and "train.jsonl 200 rows" in printed
    assert {p.name for p in out.iterdir()} == {"train.jsonl", "test.jsonl", "prompts.jsonl", "pretrain.txt", "meta.json"}
    assert len(_jsonl(out / "train.jsonl")) == 200 and len(_jsonl(out / "test.jsonl")) == 100


@pytest.mark.parametrize("argv, fragment", [
    (["--tasks", "arith,sorted"], "unknown task 'sorted'; did you mean 'sort'?"),
    (["--n", "0"], "argument --n"),
    (["--tasks", ","], "no tasks given"),
])
def test_cli_data_instruct_errors(tmp_path, capsys, argv, fragment):
    assert main(["data", "instruct", "--out", str(tmp_path / "x"), "--no-progress", *argv]) == 2
    err = capsys.readouterr().err
    assert err.startswith("worldloom: error: ") and len(err.strip().splitlines()) == 1 and fragment in err, err
    assert not (tmp_path / "x").exists()
