"""The ReAct loop (Yao et al. 2023): the model reasons and acts, a tool observes, until a final answer.

The model reads ``tune.prompt_format`` around ``[tools: calculator] QUESTION`` (``[tools: none]``
without tools: it must answer directly) and writes::

    Thought: I need the calculator.
    Action: calculator
    Action Input: (23+58)*4-17
    Observation: 307            <- written by the loop, not the model
    Final Answer: 307

Generation stops at ``Observation:`` (or at the blank line that ends a response, ``STOP``); the
loop parses what the model wrote, runs the tool and appends ``Observation: RESULT``, then lets
the model go on, until a ``Final Answer:`` line or the step limit. Decoding is the run's own
(`decode.stream_batch`, greedy by default); several questions run as one batch.

Malformed output never crashes the loop. An unknown tool, an empty Action Input, a tool that
refuses its input, or an action without tools becomes an observation ``error: ...`` the model
can react to; text after the Action Input or the Final Answer line is cut from the trace; the
loop stops, with a reason (`Result.stopped_because`), at a final answer (``final_answer``),
output with neither an action nor a final answer (``no_action``), the same action and input a
second time (``repeated_action``), a trace that no longer fits the context (``context_full``)
or the step limit (``max_steps``).
"""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

from .tools import Tool, ToolError

STOP = "\n\n"  # a response (a whole trace, or a direct answer) ends with a blank line
OBSERVATION = "Observation:"
MAX_OBSERVATION = 500  # characters of one observation kept in the trace
STOP_REASONS = ("final_answer", "no_action", "repeated_action", "context_full", "max_steps")

_LINE = re.compile(r"(Thought|Action Input|Action|Final Answer)\s*:[ \t]*(.*)")


def agent_prompt(question: str, tool_names: list[str]) -> str:
    """The question with the tools the model may use (the mode switch: ``none`` = answer directly)."""
    return f"[tools: {', '.join(tool_names) or 'none'}] {question.strip()}"


@dataclass
class Step:
    thought: str
    action: str | None = None
    action_input: str | None = None
    observation: str | None = None


@dataclass
class Result:
    answer: str | None
    steps: list[Step]
    trace: str  # everything after the prompt: the model's text and the observations
    stopped_because: str  # one of STOP_REASONS
    problem: str = ""  # what was wrong with the model's output, when something was

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class Parsed:
    """One model turn: the kept text (cut after its Action Input or Final Answer line) and what it says."""

    text: str
    thought: str = ""
    action: str | None = None
    action_input: str | None = None
    answer: str | None = None
    notes: list[str] = field(default_factory=list)


def parse_turn(text: str) -> Parsed:
    """Read one turn of model output line by line: thoughts, then the first Action (with the Action
    Input that follows it) or Final Answer; whatever comes after that is dropped (and noted)."""
    lines = text.split("\n")
    out = Parsed(text)
    thoughts = []
    for i, line in enumerate(lines):
        m = _LINE.match(line.strip())
        key, value = (m[1], m[2].strip()) if m else (None, line.strip())
        if key == "Final Answer" and out.action is None:
            out.answer = value
            return _cut(out, lines, i, thoughts)
        if key == "Action" and out.action is None:
            out.action = value
        elif key == "Action Input" and out.action is not None:
            out.action_input = value
            return _cut(out, lines, i, thoughts)
        elif key == "Thought" or (key is None and value and out.action is None):
            thoughts.append(value)
    if out.action is not None:
        out.notes.append("an Action without an Action Input")
    out.thought = " ".join(t for t in thoughts if t)
    return out


def _cut(out: Parsed, lines: list[str], i: int, thoughts: list[str]) -> Parsed:
    rest = "\n".join(lines[i + 1:]).strip()
    if rest:
        out.notes.append(f"text after the {'Final Answer' if out.answer is not None else 'Action Input'} dropped: {rest[:40]!r}")
    out.text = "\n".join(lines[: i + 1]) + "\n"
    out.thought = " ".join(t for t in thoughts if t)
    return out


class _Row:
    """One question's loop state."""

    def __init__(self, index: int, prompt: str):
        self.index, self.prompt, self.trace, self.steps, self.seen = index, prompt, "", [], set()
        self.result: Result | None = None

    def stop(self, reason: str, answer: str | None = None, problem: str = "") -> None:
        self.result = Result(answer, self.steps, self.trace, reason, problem)


class RunModel:
    """A text run as the agent's language model: its chat template, its context, and completions
    of several texts at once with the run's own decoding (`decode.stream_batch`), cut at the stop
    strings. Anything with ``prompt_format``, ``fits(prompt, trace)`` and ``complete(pairs, turn, on_text)``
    can stand in for it (the tests script a model that way)."""

    def __init__(self, run, max_new_tokens: int = 128, temperature: float = 0.0, seed: int = 0):
        from ..errors import ConfigError

        if isinstance(run, (str, Path)):
            from ..run import load_run

            run = load_run(Path(run))
        if run.is_world:
            raise ConfigError(f"{run.run_dir} is a world model; the agent needs a text run (give the world run "
                              "as a tool: --tools world=RUN)")
        self.run, self.max_new_tokens, self.temperature, self.seed = run, max_new_tokens, temperature, seed
        self.prompt_format = run.cfg.tune.prompt_format

    def ids(self, prompt: str, trace: str) -> list[int]:
        """Prompt and trace encoded apart, as `tune sft` encodes a prompt and its response (BPE merges
        differ across the seam otherwise)."""
        encode = self.run.tokenizer.encode
        return encode(prompt).tolist() + (encode(trace).tolist() if trace else [])

    def fits(self, prompt: str, trace: str) -> bool:
        return len(self.ids(prompt, trace)) < self.run.cfg.model.context

    def complete(self, texts: list[tuple[str, str]], turn: int, on_text: Callable[[int, str], None] | None = None) -> list[str]:
        """Continuations of (prompt, trace) pairs, cut at ``Observation:`` or the end of a response."""
        from ..decode import SamplingConfig, stream_batch

        sc = SamplingConfig(max_new_tokens=self.max_new_tokens, temperature=self.temperature, seed=self.seed + turn)
        outs = [""] * len(texts)
        ids = [self.ids(prompt, trace) for prompt, trace in texts]
        for i, text in stream_batch(self.run.model, self.run.tokenizer, ids, sc, stop=[OBSERVATION, STOP]):
            outs[i] += text
            if on_text:
                on_text(i, text)
        return outs


class Agent:
    """A language model with tools, answering questions by the ReAct loop.

    ``Agent(run, tools=[Calculator()]).run("what is (23+58)*4-17?")`` -> `Result`; `run` is a text run
    (a folder or a `LoadedRun`, wrapped in `RunModel`) or a model object like it. ``tools=[]`` asks
    for a direct answer (``[tools: none]``). ``on_text(i, text)`` sees question i's model text as it
    streams and every observation the loop appends."""

    def __init__(self, run, tools: list[Tool] = (), max_steps: int = 8, max_new_tokens: int = 128,
                 temperature: float = 0.0, seed: int = 0, on_text: Callable[[int, str], None] | None = None):
        from ..errors import ConfigError

        names = [t.name for t in tools]
        if len(set(names)) != len(names):
            raise ConfigError(f"tools named twice: {', '.join(names)}")
        if max_steps < 1:
            raise ConfigError(f"max_steps must be at least 1, got {max_steps}")
        self.model = run if hasattr(run, "complete") else RunModel(run, max_new_tokens, temperature, seed)
        self.tools, self.max_steps, self.on_text = {t.name: t for t in tools}, max_steps, on_text

    def prompt(self, question: str) -> str:
        return self.model.prompt_format.replace("{prompt}", agent_prompt(question, list(self.tools)))

    def run_batch(self, questions: list[str]) -> list[Result]:
        """Every question's loop, the model's turns decoded as one batch."""
        rows = [_Row(i, self.prompt(q)) for i, q in enumerate(questions)]
        for r in rows:
            self._check_fits(r)
        for turn in range(self.max_steps + 1):
            live = [r for r in rows if r.result is None]
            if not live:
                break
            for r, text in zip(live, self._generate(live, turn)):
                self._advance(r, text, last=turn == self.max_steps)
        for r in rows:
            if r.result is None:
                r.stop("max_steps", problem=f"no final answer after {self.max_steps} steps")
        return [r.result for r in rows]

    def run(self, question: str) -> Result:
        return self.run_batch([question])[0]

    def _generate(self, live: list[_Row], turn: int) -> list[str]:
        show = (lambda i, text: self.on_text(live[i].index, text)) if self.on_text else None
        return self.model.complete([(r.prompt, r.trace) for r in live], turn, show)

    def _advance(self, row: _Row, text: str, last: bool) -> None:
        """Parse a turn; stop the row, or run its tool and append the observation."""
        p = parse_turn(text)
        row.trace += p.text
        problem = "; ".join(p.notes)
        if p.answer is not None:
            row.steps.append(Step(p.thought))
            return row.stop("final_answer", p.answer, problem)
        if p.action is None or p.action_input is None:
            return row.stop("no_action", problem=problem or f"neither an Action nor a Final Answer in {text[:60]!r}")
        key = (p.action, p.action_input)
        if key in row.seen:
            return row.stop("repeated_action", problem=f"the same action again: {p.action} {p.action_input[:40]!r}")
        row.seen.add(key)
        if last:
            return None  # the step limit: the action is not run
        obs = self._observe(p.action, p.action_input)
        row.steps.append(Step(p.thought, p.action, p.action_input, obs))
        row.trace += f"{OBSERVATION} {obs}\n"
        if self.on_text:
            self.on_text(row.index, f"{OBSERVATION} {obs}\n")
        self._check_fits(row)
        return None

    def _check_fits(self, row: _Row) -> None:
        if not self.model.fits(row.prompt, row.trace):
            row.stop("context_full", problem="the prompt and trace no longer fit the model's context")

    def _observe(self, action: str, text: str) -> str:
        """The tool's answer, or ``error: ...`` for an unknown tool, an empty input or a refused one."""
        if not self.tools:
            return "error: no tools are available; give the Final Answer"
        if action not in self.tools:
            return f"error: unknown tool {action[:40]!r}; tools: {', '.join(self.tools)}"
        if not text.strip():
            return f"error: empty Action Input for {action}"
        try:
            out = self.tools[action](text)
        except ToolError as e:
            out = f"error: {e}"
        out = " ".join(str(out).split())  # one line: the loop reads lines
        return out[:MAX_OBSERVATION]
