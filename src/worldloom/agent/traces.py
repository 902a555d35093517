"""Synthetic ReAct traces from a program that knows the answers (`worldloom data react`).

Questions are multi-step arithmetic: 2 or 3 operations (+ - *) on numbers of 1 to 3 digits, with
the parentheses the order of operations needs (``what is (23+58)*4-17?``). The generator computes
each answer from its own numbers; the trace's ``Observation:`` is filled in by actually running
the `Calculator` on the Action Input, and the tests compare the two. Each question gives two rows:

- with tools: prompt ``[tools: calculator] QUESTION``, response the whole trace (Thought, Action,
  Action Input, Observation, Final Answer);
- without: prompt ``[tools: none] QUESTION``, response ``Final Answer: ANSWER``.

So one model trained on both learns both modes, and "the same model without tools" is that model
with the tools switched off in its prompt. A response ends with a blank line (`react.STOP`), so
tune on these rows with ``tune.stop="\\n\\n"``. The split is `worldloom data instruct`'s: a
question is held out iff ``sha256(question) % 10 == 0``, so neither mode of a test question is
ever trained on.

Files: train.jsonl (both modes), train_tools.jsonl, train_direct.jsonl (one mode each), test.jsonl
(``question``, ``answer``, and the with-tools ``prompt``/``response``), pretrain.txt (the training
rows rendered, for a base run) and meta.json.
"""

from __future__ import annotations

import random
from pathlib import Path

from ..errors import ConfigError
from ..tune.data import PROMPT_FORMAT, render_prompt
from ..tune.tasks import _check_out, _jsonl, _write, family_rows
from .react import STOP, agent_prompt
from .tools import Calculator

MARKER = "worldloom_react"
TASK = "react"
_QUESTION = ("what is {e}?", "{e}=?", "compute {e}")
_PREC = {"+": 0, "-": 0, "*": 1}


def _number(rng: random.Random) -> int:
    digits = rng.randint(1, 3)
    return rng.randint(1 if digits == 1 else 10 ** (digits - 1), 10**digits - 1)


def expression(rng: random.Random) -> tuple[str, int]:
    """An expression of 2 or 3 operations and its value, computed from the generator's own numbers."""
    text, value, prec = str(n := _number(rng)), n, 2
    for _ in range(rng.randint(2, 3)):
        op, n = rng.choice("+-*"), _number(rng)
        if op == "*" and n > 99:
            n //= 10  # keep products of reasonable size
        if rng.random() < 0.5:  # the expression so far on the left: parentheses if it binds looser
            left = f"({text})" if prec < _PREC[op] else text
            text, value = f"{left}{op}{n}", _apply(op, value, n)
        else:  # on the right: parentheses unless it binds tighter
            right = f"({text})" if prec <= _PREC[op] else text
            text, value = f"{n}{op}{right}", _apply(op, n, value)
        prec = _PREC[op]
    return text, value


def _apply(op: str, a: int, b: int) -> int:
    return a + b if op == "+" else a - b if op == "-" else a * b


def question(rng: random.Random) -> tuple[str, str]:
    e, value = expression(rng)
    return rng.choice(_QUESTION).format(e=e), str(value)


def expression_of(q: str) -> str:
    """The expression a question asks about (the inverse of `question`'s templates)."""
    for template in _QUESTION:
        head, tail = template.split("{e}")
        if q.startswith(head) and q.endswith(tail) and len(q) > len(head) + len(tail):
            return q[len(head): len(q) - len(tail)]
    raise ValueError(f"not a react question: {q[:60]!r}")


def react_trace(q: str, calculator=None) -> str:
    """The with-tools response: one calculator call on the question's expression, its real result observed."""
    e = expression_of(q)
    observed = (calculator or Calculator())(e)
    return f"Thought: I need the calculator.\nAction: calculator\nAction Input: {e}\nObservation: {observed}\nFinal Answer: {observed}"


def rows_of(q: str, answer: str, calculator) -> list[dict]:
    """The two training rows of a question: with tools (the trace) and without (the direct answer)."""
    return [{"prompt": agent_prompt(q, ["calculator"]), "response": react_trace(q, calculator), "mode": "tools"},
            {"prompt": agent_prompt(q, []), "response": f"Final Answer: {answer}", "mode": "direct"}]


def make_react(n: int, out: Path, seed: int = 0, test_n: int | None = None) -> dict:
    """Write the files (see the module doc) into `out`; the meta."""
    test_n = max(100, n // 10) if test_n is None else test_n
    for name, value in (("n", n), ("test_n", test_n)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ConfigError(f"{name} must be a positive integer, got {value!r}")
    out = Path(out)
    _check_out(out, MARKER, "react")
    train_q, test_q = family_rows(TASK, n, test_n, seed, make=question)
    calc = Calculator()
    train = [row for r in train_q for row in rows_of(r["prompt"], r["response"], calc)]
    random.Random(f"worldloom-react:{seed}:shuffle").shuffle(train)
    test = [{"question": r["prompt"], "answer": r["response"], "prompt": agent_prompt(r["prompt"], ["calculator"]),
             "response": react_trace(r["prompt"], calc)} for r in test_q]
    files = {
        "train.jsonl": _jsonl(train),
        "train_tools.jsonl": _jsonl([r for r in train if r["mode"] == "tools"]),
        "train_direct.jsonl": _jsonl([r for r in train if r["mode"] == "direct"]),
        "test.jsonl": _jsonl(test),
        "pretrain.txt": "".join(render_prompt(r["prompt"]) + r["response"] + STOP for r in train),
    }
    meta = {MARKER: 1, "seed": seed, "format": PROMPT_FORMAT, "stop": STOP, "questions": {"train": n, "test": test_n},
            "rows": {"train": len(train), "test": len(test)},
            "tune": 'worldloom tune sft RUN data.path=train.jsonl \'tune.stop="\\n\\n"\'',
            "split": "a question is in the test split iff the first 8 bytes of sha256(question) are 0 mod 10; "
                     "both modes of a question fall on the same side",
            "files": sorted(files)}
    _write(out, files, meta)
    return meta
