"""The agent's tools: a safe calculator, the world model (`imagine`) and the real environment (`act`).

A tool is a name, a one-line description and a call from the text after ``Action Input:`` to the
text of the ``Observation:``. A tool refuses bad input by raising `ToolError`; the loop turns that
into an observation ``error: ...`` the model reads, so no input a model writes can crash the loop.

The calculator PARSES its input with Python's ``ast`` module and walks only the nodes of plain
arithmetic (numbers, + - * / // % **, unary minus and plus, parentheses); anything else (names,
calls, attributes, strings, lambdas, comparisons) is refused, and nothing is ever evaluated by
Python. Powers have a bounded exponent and every result a bounded size.

``imagine`` and ``act`` read ``SEED: ACTION, ACTION, ...`` (``3: forward, forward, left``): the
environment is reset with the seed (the real one for both: the world model starts from the real
first observation, as `WorldModelEnv` does), the actions are taken (imagined by the model, or
in the real environment), and the last view is described in words as `worldloom data instruct`'s
babyai prompts describe one (``you see: a red ball 2 ahead.``), with the reward and the end.
"""

from __future__ import annotations

import ast
import math
import operator
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Protocol

from ..errors import ConfigError

MAX_INPUT = 200  # characters of calculator input
MAX_EXPONENT = 64  # |b| in a ** b
MAX_DIGITS = 30  # a result (and every intermediate) has at most this many integer digits
MAX_ACTIONS = 64  # actions in one imagine/act call


class ToolError(ValueError):
    """A tool's input cannot be used; the message becomes the observation ``error: MESSAGE``."""


class Tool(Protocol):
    name: str
    description: str

    def __call__(self, text: str) -> str: ...


# ---------------------------------------------------------------------------- calculator

_BINARY: dict[type, Callable] = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul,
                                 ast.Div: operator.truediv, ast.FloorDiv: operator.floordiv, ast.Mod: operator.mod,
                                 ast.Pow: operator.pow}
_UNARY: dict[type, Callable] = {ast.USub: operator.neg, ast.UAdd: operator.pos}
_NAMES = {ast.Name: "a name", ast.Call: "a function call", ast.Attribute: "an attribute", ast.Lambda: "a lambda",
          ast.Compare: "a comparison", ast.BoolOp: "a boolean operator", ast.Subscript: "a subscript",
          ast.IfExp: "a conditional", ast.NamedExpr: "an assignment"}


def _refuse(node: ast.AST) -> ToolError:
    what = _NAMES.get(type(node))
    if isinstance(node, ast.Constant):
        what = f"a {type(node.value).__name__} constant"
    elif isinstance(node, (ast.BinOp, ast.UnaryOp)):
        what = f"the operator {type(node.op).__name__}"
    return ToolError(f"only arithmetic is allowed (numbers, + - * / // % **, parentheses), found {what or type(node).__name__}")


def _bounded(x):
    if isinstance(x, complex):
        raise ToolError("the result is not a real number")
    if isinstance(x, float) and not math.isfinite(x):
        raise ToolError("the result is not a finite number")
    if abs(x) >= 10**MAX_DIGITS:
        raise ToolError(f"the result has more than {MAX_DIGITS} digits")
    return x


def _power(a, b):
    if abs(b) > MAX_EXPONENT:
        raise ToolError(f"the exponent {b} is beyond ±{MAX_EXPONENT}")
    if a == 0 and b < 0:
        raise ToolError("zero to a negative power")
    if abs(a) > 1 and abs(b) * math.log10(abs(a)) >= MAX_DIGITS:
        raise ToolError(f"the result has more than {MAX_DIGITS} digits")
    return a ** b


def _walk(node: ast.AST):
    """The value of an arithmetic node; ToolError for any other node."""
    if isinstance(node, ast.Constant) and type(node.value) in (int, float):
        return _bounded(node.value)
    if isinstance(node, ast.UnaryOp) and type(node.op) in _UNARY:
        return _UNARY[type(node.op)](_walk(node.operand))
    if isinstance(node, ast.BinOp) and type(node.op) in _BINARY:
        a, b = _walk(node.left), _walk(node.right)
        if isinstance(node.op, ast.Pow):
            return _bounded(_power(a, b))
        try:
            return _bounded(_BINARY[type(node.op)](a, b))
        except ZeroDivisionError:
            raise ToolError("division by zero") from None
    raise _refuse(node)


def format_number(x) -> str:
    """An int as it is; a float to 12 significant digits, without a trailing ``.0``."""
    if isinstance(x, int):
        return str(x)
    if x == int(x) and abs(x) < 1e15:
        return str(int(x))
    return f"{x:.12g}"


def calculate(text: str) -> str:
    """The value of an arithmetic expression, as text; ToolError for anything else."""
    text = text.strip()
    if not text:
        raise ToolError("empty input; give an arithmetic expression such as (23+58)*4-17")
    if len(text) > MAX_INPUT:
        raise ToolError(f"the input is {len(text)} characters, over the limit of {MAX_INPUT}")
    try:
        tree = ast.parse(text, mode="eval")
    except (SyntaxError, ValueError, RecursionError, MemoryError):
        raise ToolError(f"not an arithmetic expression: {text[:60]!r}") from None
    try:
        return format_number(_walk(tree.body))
    except (RecursionError, OverflowError):
        raise ToolError("the expression is too deep or too large") from None


class Calculator:
    name = "calculator"
    description = "arithmetic: numbers, + - * / // % ** and parentheses, e.g. (23+58)*4-17"

    def __call__(self, text: str) -> str:
        return calculate(text)


# ---------------------------------------------------------------------------- world model and environment

_CALL = re.compile(r"\s*(?:seed\s*)?([0-9]{1,10})\s*[:;,]?\s*(.*)", re.S)


def parse_actions(text: str, names: tuple[str, ...]) -> tuple[int, list[int]]:
    """``SEED: ACTION, ACTION ...`` -> (seed, action indices); actions by name or number."""
    m = _CALL.fullmatch(text)
    if not m:
        raise ToolError(f"expected SEED: ACTION, ACTION, ... (e.g. 3: forward, left), got {text[:60]!r}")
    seed, words = int(m[1]), [w for w in re.split(r"[\s,]+", m[2].strip()) if w]
    if seed >= 2**31:
        raise ToolError(f"the seed {seed} is beyond 2**31 - 1")
    if len(words) > MAX_ACTIONS:
        raise ToolError(f"{len(words)} actions, over the limit of {MAX_ACTIONS}")
    actions = []
    for w in words:
        if w.isdigit() and int(w) < len(names):
            actions.append(int(w))
        elif w.lower() in names:
            actions.append(names.index(w.lower()))
        else:
            raise ToolError(f"unknown action {w[:20]!r}; actions: {', '.join(names)}")
    return seed, actions


def play(env, seed: int, actions: list[int]) -> tuple[dict, float, bool, int]:
    """Reset a gymnasium env with `seed`, take `actions` until the episode ends: (last observation,
    total reward, whether it ended, actions taken)."""
    obs, _ = env.reset(seed=seed)
    total, done, taken = 0.0, False, 0
    for a in actions:
        obs, reward, term, trunc, _ = env.step(a)
        total, done, taken = total + float(reward), bool(term or trunc), taken + 1
        if done:
            break
    return obs, total, done, taken


def describe_outcome(obs: dict, reward: float, done: bool, taken: int, asked: int) -> str:
    """The observation's text: the view in words, the reward, and whether (and when) the episode ended."""
    from ..tune.tasks import describe_view

    end = f"the episode ended after {taken} of {asked} actions" if done else "not done"
    return f"{describe_view(obs['image'])} reward {reward:g}, {end}."


@dataclass
class EnvTool:
    """`imagine` or `act`: actions from a seed in an env (the world model's or the real one)."""

    name: str
    description: str
    env: object  # a gymnasium env with reset(seed=) and step(a) whose observations hold a MiniGrid "image"
    action_names: tuple[str, ...]

    def __call__(self, text: str) -> str:
        seed, actions = parse_actions(text, self.action_names)
        return describe_outcome(*play(self.env, seed, actions), asked=len(actions))


def _check_symbolic(adapter, what: str) -> None:
    """The env tools describe MiniGrid cells in words: a pixel world (frames only) is refused in one line."""
    from ..world.envs.pixels import PIXELS

    if PIXELS in adapter.obs_fields:
        raise ConfigError(f"the {what} tool describes MiniGrid cells in words; {adapter.env_id} is a pixel world "
                          "(give a symbolic world run or env, e.g. BabyAI-GoToLocal-v0)")


def imagine_tool(world_run) -> EnvTool:
    """The world model of a world run (a folder or a LoadedRun) as the `imagine` tool."""
    from ..world.rollout.imagine import WorldModelEnv

    env = WorldModelEnv(world_run)
    _check_symbolic(env.adapter, "imagine")
    return EnvTool("imagine", "what the world model predicts after actions from a seed: SEED: ACTION, ACTION, ...",
                   env, tuple(env.adapter.action_names))


def act_tool(env_id: str) -> EnvTool:
    """The real environment `env_id` as the `act` tool."""
    from ..world.envs import make_adapter

    adapter = make_adapter(env_id)
    _check_symbolic(adapter, "act")
    return EnvTool("act", f"take actions in the real {env_id} from a seed: SEED: ACTION, ACTION, ...",
                   adapter.make(), tuple(adapter.action_names))


# ---------------------------------------------------------------------------- --tools

TOOL_WORDS = ("calculator", "world", "env")


def make_tools(spec: str) -> list[Tool]:
    """``calculator,world=runs/babyai,env[=ENV_ID]`` -> the tools (world=RUN gives `imagine`; env gives
    `act` in ENV_ID, by default the world run's environment or BabyAI-GoToLocal-v0)."""
    import difflib

    from ..run import load_world_run
    from ..tune.tasks import BABYAI_ENV

    items = [w.strip() for w in spec.split(",") if w.strip()]
    words = dict(w.split("=", 1) if "=" in w else (w, "") for w in items)
    for word in words:
        if word not in TOOL_WORDS:
            close = difflib.get_close_matches(word, TOOL_WORDS, n=1)
            raise ConfigError(f"unknown tool {word!r}" + (f"; did you mean {close[0]!r}?" if close else "")
                              + f" (tools: calculator, world=RUN, env[=ENV_ID])")
    if "world" in words and not words["world"]:
        raise ConfigError("world needs a world run: --tools world=runs/babyai")
    tools: list[Tool] = [Calculator()] if "calculator" in words else []
    world = load_world_run(Path(words["world"])) if words.get("world") else None
    if world is not None:
        tools.append(imagine_tool(world))
    if "env" in words:
        tools.append(act_tool(words["env"] or (world.cfg.env.id if world is not None else BABYAI_ENV)))
    return tools
