"""The ReAct agent: the parser on malformed output, the safe calculator, the loop with a scripted
model, the world tools, the synthetic traces, and the CLI's one-line errors."""

from __future__ import annotations

import builtins
import json
import random

import pytest

from worldloom.agent import Agent, Calculator, ToolError, calculate, make_tools, parse_turn
from worldloom.agent.react import STOP_REASONS
from worldloom.agent.tools import act_tool, imagine_tool, parse_actions
from worldloom.agent.traces import expression_of, make_react, question, react_trace
from worldloom.cli import main
from worldloom.errors import ConfigError, DataError

# ---------------------------------------------------------------------------- parser


def test_parse_action_and_input():
    p = parse_turn("Thought: I need the calculator.\nAction: calculator\nAction Input: (2+3)*4\n")
    assert (p.thought, p.action, p.action_input, p.answer) == ("I need the calculator.", "calculator", "(2+3)*4", None)
    assert p.notes == []


def test_parse_final_answer_drops_what_follows():
    p = parse_turn("Thought: done\nFinal Answer: 42\nAction: calculator\nAction Input: 1+1\n")
    assert p.answer == "42" and p.action is None
    assert p.text == "Thought: done\nFinal Answer: 42\n"
    assert "dropped" in p.notes[0]


def test_parse_text_after_action_input_is_cut():
    p = parse_turn("Action: calculator\nAction Input: 1+1\nObservation 2 (made up)\nFinal Answer: 2")
    assert (p.action, p.action_input, p.answer) == ("calculator", "1+1", None)
    assert p.text == "Action: calculator\nAction Input: 1+1\n" and p.notes


@pytest.mark.parametrize("text", ["", "hello there", "Thought: hmm\n", "Action Input: 1+1\n", "Final answer 3", "\x00\n\n::"])
def test_parse_malformed_has_neither(text):
    p = parse_turn(text)
    assert p.action_input is None and p.answer is None


def test_parse_action_without_input_is_noted():
    p = parse_turn("Thought: x\nAction: calculator\n")
    assert p.action == "calculator" and p.action_input is None and "without an Action Input" in p.notes[0]


# ---------------------------------------------------------------------------- calculator


@pytest.mark.parametrize("expr, value", [
    ("(23+58)*4-17", "307"), ("-3+2", "-1"), ("--4", "4"), ("+5", "5"), ("7/2", "3.5"), ("6/3", "2"), ("7//2", "3"),
    ("-7//2", "-4"), ("7%3", "1"), ("2**10", "1024"), ("2**-2", "0.25"), ("1.5*2", "3"), (" 2 + 3 ", "5"),
    ("((((1))))", "1"), ("0.1+0.2", "0.3"), ("10**29", str(10**29)), ("(" * 99 + "1" + ")" * 99, "1"), ("-" * 199 + "1", "-1"),
])
def test_calculator_accepts_arithmetic(expr, value):
    assert calculate(expr) == value


@pytest.mark.parametrize("expr, why", [
    ("x+1", "a name"), ("abs(-1)", "a function call"), ("__import__('os').system('echo hi')", "a function call"),
    ("(1).real", "an attribute"), ("lambda: 1", "a lambda"), ("'ab'*3", "a str constant"), ("b'a'", "a bytes constant"),
    ("1<2", "a comparison"), ("True+1", "a bool constant"), ("[1]", "List"), ("1j*2", "a complex constant"),
    ("1 if 1 else 2", "a conditional"), ("(y:=3)", "an assignment"), ("1 and 2", "a boolean operator"), ("~1", "Invert"),
    ("1<<2", "LShift"), ("2**1000", "exponent"), ("9**9**9", "exponent"), ("10**30", "more than 30 digits"),
    ("99999999999999999*99999999999999999", "more than 30 digits"), ("1e400", "not a finite number"),
    ("(-8)**0.5", "not a real number"), ("1/0", "division by zero"), ("5%0", "division by zero"), ("0**-1", "zero"),
    ("", "empty input"), ("   ", "empty input"), ("1+" * 150 + "1", "over the limit"), ("2+", "not an arithmetic expression"),
    ("import os", "not an arithmetic expression"),
])
def test_calculator_refuses_everything_else(expr, why):
    with pytest.raises(ToolError, match=why.replace("(", r"\(").replace("*", r"\*")):
        calculate(expr)


def test_calculator_never_evaluates(monkeypatch):
    def refuse(*a, **k):
        raise AssertionError("eval/exec called")

    for name in ("eval", "exec"):  # (ast.parse itself calls compile, to parse only)
        monkeypatch.setattr(builtins, name, refuse)
    assert calculate("(23+58)*4-17") == "307"
    with pytest.raises(ToolError):
        calculate("__import__('os')")


# ---------------------------------------------------------------------------- the loop, with a scripted model


class Scripted:
    """A model whose turns are given per question; records what it was shown."""

    prompt_format = "Q: {prompt}\nA: "

    def __init__(self, scripts: dict[str, list[str]], limit: int = 10_000):
        self.scripts = {q: list(turns) for q, turns in scripts.items()}
        self.limit, self.shown = limit, []

    def fits(self, prompt: str, trace: str) -> bool:
        return len(prompt + trace) < self.limit

    def complete(self, pairs, turn, on_text=None):
        out = []
        for i, (prompt, trace) in enumerate(pairs):
            text = prompt + trace
            self.shown.append(text)
            q = next(q for q in self.scripts if q in text)
            out.append(self.scripts[q].pop(0) if self.scripts[q] else "")
            if on_text:
                on_text(i, out[-1])
        return out


def _agent(turns, tools=(Calculator(),), **kw):
    model = Scripted({"Q?": turns}, **kw.pop("model", {}))
    return Agent(model, list(tools), **kw), model


def test_loop_reaches_final_answer_with_the_tools_result():
    agent, model = _agent(["Thought: I need the calculator.\nAction: calculator\nAction Input: (23+58)*4-17\n",
                           "Final Answer: 307"])
    res = agent.run("Q?")
    assert (res.answer, res.stopped_because, res.problem) == ("307", "final_answer", "")
    assert res.steps[0].action == "calculator" and res.steps[0].observation == "307"
    assert model.shown[0] == "Q: [tools: calculator] Q?\nA: "
    assert model.shown[1].endswith("Action Input: (23+58)*4-17\nObservation: 307\n")
    assert res.trace.endswith("Observation: 307\nFinal Answer: 307\n")


def test_loop_stops_at_the_step_limit():
    agent, _ = _agent([f"Action: calculator\nAction Input: {i}+1\n" for i in range(10)], max_steps=3)
    res = agent.run("Q?")
    assert res.stopped_because == "max_steps" and res.answer is None
    assert [s.observation for s in res.steps] == ["1", "2", "3"]


def test_loop_stops_at_a_repeated_action():
    agent, _ = _agent(["Action: calculator\nAction Input: 1+1\n"] * 3)
    res = agent.run("Q?")
    assert res.stopped_because == "repeated_action" and len(res.steps) == 1 and "same action" in res.problem


def test_unknown_tool_empty_input_and_refused_input_become_observations():
    agent, _ = _agent(["Action: search\nAction Input: weather\n", "Action: calculator\nAction Input:\n",
                       "Action: calculator\nAction Input: open('x')\n", "Final Answer: 1"])
    res = agent.run("Q?")
    obs = [s.observation for s in res.steps if s.action]
    assert obs[0] == "error: unknown tool 'search'; tools: calculator"
    assert obs[1] == "error: empty Action Input for calculator"
    assert obs[2].startswith("error: only arithmetic is allowed")
    assert res.stopped_because == "final_answer" and res.answer == "1"


def test_without_tools_an_action_is_told_to_answer():
    agent, model = _agent(["Action: calculator\nAction Input: 1+1\n", "Final Answer: 2"], tools=())
    res = agent.run("Q?")
    assert model.shown[0] == "Q: [tools: none] Q?\nA: "
    assert res.steps[0].observation.startswith("error: no tools") and res.answer == "2"


@pytest.mark.parametrize("turn", ["", "I think it is 5", "Thought: hmm"])
def test_output_without_action_or_answer_stops_cleanly(turn):
    res = _agent([turn])[0].run("Q?")
    assert res.stopped_because == "no_action" and res.answer is None and res.problem


def test_context_full_stops():
    agent, _ = _agent(["Action: calculator\nAction Input: 1+1\n", "Final Answer: 2"], model={"limit": 40})
    res = agent.run("Q?")
    assert res.stopped_because == "context_full" and res.steps[0].observation == "2"


def test_batch_keeps_questions_apart_and_streams():
    seen = []
    model = Scripted({"A?": ["Action: calculator\nAction Input: 2*3\n", "Final Answer: 6"], "B?": ["Final Answer: 9"]})
    results = Agent(model, [Calculator()], on_text=lambda i, t: seen.append((i, t))).run_batch(["A?", "B?"])
    assert [r.answer for r in results] == ["6", "9"] and results[0].steps[0].observation == "6"
    assert (0, "Observation: 6\n") in seen and (1, "Final Answer: 9") in seen


def test_agent_refuses_bad_settings():
    with pytest.raises(ConfigError, match="named twice"):
        Agent(Scripted({}), [Calculator(), Calculator()])
    with pytest.raises(ConfigError, match="max_steps"):
        Agent(Scripted({}), [], max_steps=0)


def test_real_run_through_the_loop(loaded):
    res = Agent(loaded, [Calculator()], max_steps=2, max_new_tokens=12).run("what is 2+3?")
    assert res.stopped_because in STOP_REASONS and isinstance(res.trace, str)


# ---------------------------------------------------------------------------- world tools


def test_act_describes_the_real_environment():
    from worldloom.tune.tasks import BABYAI_ENV, describe_view
    from worldloom.world.envs import make_adapter

    tool = act_tool(BABYAI_ENV)
    out = tool("seed 5: left, forward 2")
    env = make_adapter(BABYAI_ENV).make()
    env.reset(seed=5)
    for a in (0, 2, 2):  # left, forward, forward
        obs, reward, *_ = env.step(a)
    assert out.startswith(describe_view(obs["image"])) and "reward" in out


def test_parse_actions_refuses_bad_input():
    names = ("left", "right", "forward")
    assert parse_actions("3: forward, LEFT 1", names) == (3, [2, 0, 1])
    for text, why in (("go left", "expected SEED"), ("3: jump", "unknown action"), ("3: " + "left " * 65, "over the limit"),
                      ("99999999999: left", "beyond")):
        with pytest.raises(ToolError, match=why):
            parse_actions(text, names)


def test_imagine_uses_the_world_model(world_run):
    tool = imagine_tool(world_run)
    assert tool.name == "imagine" and tool("0: forward, left").startswith("you see:")


def test_make_tools():
    assert [t.name for t in make_tools("calculator")] == ["calculator"]
    assert [t.name for t in make_tools("calculator,env")] == ["calculator", "act"]
    with pytest.raises(ConfigError, match="did you mean 'calculator'"):
        make_tools("calculater")
    with pytest.raises(ConfigError, match="world needs a world run"):
        make_tools("world")


# ---------------------------------------------------------------------------- synthetic traces


def test_trace_observations_are_the_calculators_results():
    rng = random.Random(1)
    for _ in range(500):
        q, answer = question(rng)
        trace = react_trace(q)
        assert calculate(expression_of(q)) == answer  # the generator's own arithmetic agrees with the tool
        assert f"\nObservation: {answer}\n" in trace and trace.endswith(f"Final Answer: {answer}")


def test_make_react_splits_by_question(tmp_path):
    meta = make_react(400, tmp_path / "react", test_n=40)
    rows = [json.loads(line) for line in (tmp_path / "react/train.jsonl").read_text().splitlines()]
    test = [json.loads(line) for line in (tmp_path / "react/test.jsonl").read_text().splitlines()]
    assert meta["rows"] == {"train": 800, "test": 40} and len(rows) == 800
    assert {r["mode"] for r in rows} == {"tools", "direct"}
    trained = " ".join(r["prompt"] for r in rows)
    assert not any(f"] {t['question']}" in trained for t in test)
    for t in test:
        assert t["response"].endswith(f"Final Answer: {t['answer']}")
    with pytest.raises(DataError, match="not a `worldloom data react` output"):
        (tmp_path / "other").mkdir()
        (tmp_path / "other/x.txt").write_text("x")
        make_react(10, tmp_path / "other")


# ---------------------------------------------------------------------------- CLI


def test_cli_one_line_errors(tmp_path, trained_run, capsys):
    assert main(["agent", str(tmp_path / "missing"), "--tools", "calculator", "2+3?"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("worldloom: error: run folder not found") and err.count("\n") == 1
    assert main(["agent", str(trained_run), "--tools", "calculator,abacus", "2+3?"]) == 2
    err = capsys.readouterr().err
    assert "unknown tool 'abacus'" in err and err.count("\n") == 1


def test_cli_runs_and_prints_json(trained_run, capsys):
    assert main(["agent", str(trained_run), "--tools", "calculator", "what is 2+3?", "--max-steps", "1",
                 "--max-new-tokens", "8", "--json"]) == 0
    res = json.loads(capsys.readouterr().out)
    assert res["stopped_because"] in STOP_REASONS and set(res) >= {"answer", "steps", "trace"}
    assert main(["agent", str(trained_run), "what is 2+3?", "--max-new-tokens", "4", "--max-steps", "1"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("Q: [tools: none] what is 2+3?\nA: ") and "[stopped: " in out


def test_cli_data_react(tmp_path, capsys):
    assert main(["data", "react", "--n", "50", "--test-n", "5", "--out", str(tmp_path / "r")]) == 0
    assert "train.jsonl 100 rows" in capsys.readouterr().out
    assert (tmp_path / "r/meta.json").is_file() and (tmp_path / "r/pretrain.txt").read_text().count("Final Answer:") == 100
