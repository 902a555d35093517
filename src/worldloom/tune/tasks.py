"""Synthetic instruction tasks whose answers a program checks (`worldloom data instruct`).

Five families: ``arith`` (``23+58=?``, ``what is 71-9?``, small products), ``reverse`` (a string of
3-8 letters), ``sort`` (3-7 digits or letters, ascending), ``count`` (how often a letter occurs)
and ``babyai`` (a real BabyAI view from the agent's eyes described in words, and a question the
view answers). Every prompt is self-contained: ``answer_of(task, prompt)`` recomputes the
reference answer by PARSING the prompt (regular expressions and ``int``; nothing is evaluated)
and ``check(row, answer)`` compares it with an answer. The generators compute their answers from
their own numbers, so the tests compare the two.

``make_instruct`` writes train/test/prompts JSONL, a pretraining text and meta.json. The split is
by construction: a prompt is a test prompt iff ``sha256(prompt) % 10 == 0``, so no test prompt can
be in any training file.
"""

from __future__ import annotations

import difflib
import functools
import hashlib
import json
import random
import re
from collections import Counter
from pathlib import Path
from typing import Callable, NamedTuple

from ..errors import ConfigError, DataError
from ..io import atomic_write_text, remove_stale_temporaries, write_json
from .data import PROMPT_FORMAT, STOP, render_prompt

MARKER = "worldloom_instruct"  # meta.json key that marks a folder as make_instruct's output
PROMPTS_MAX = 2000  # rows of prompts.jsonl (prompts for preference sampling)
TEST_SHARE = 10  # a prompt is a test prompt iff sha256(prompt) % TEST_SHARE == 0
MAX_PROMPT = 300
_STALE = 20_000  # draws in a row without a new prompt: the family has run out of distinct prompts

# ---------------------------------------------------------------- arithmetic

_ARITH = re.compile(r"(?:what is )?([0-9]{1,4})([-+*])([0-9]{1,4})(?:=\?|\?)")


def _arith_make(rng: random.Random) -> tuple[str, str]:
    op = rng.choice("++--*")
    if op == "*":
        a, b = rng.randint(2, 9), rng.randint(2, 9)
    else:
        a, b = rng.randint(0, 99), rng.randint(0, 99)
        a, b = (max(a, b), min(a, b)) if op == "-" else (a, b)
    value = a + b if op == "+" else a - b if op == "-" else a * b
    return (f"{a}{op}{b}=?" if rng.random() < 0.5 else f"what is {a}{op}{b}?"), str(value)


def _arith_solve(prompt: str) -> str | None:
    m = _ARITH.fullmatch(prompt)
    if not m:
        return None
    a, op, b = int(m[1]), m[2], int(m[3])
    return str(a + b if op == "+" else a - b if op == "-" else a * b)


# ---------------------------------------------------------------- letters: reverse, sort, count

_LETTERS = "abcdefghijklmnopqrstuvwxyz"
_REVERSE = re.compile(r"(?:reverse: |reverse the letters of )([a-z]{1,32})")
_SORT = re.compile(r"sort(?: ascending)?: ([0-9]{1,32}|[a-z]{1,32})")
_COUNT = re.compile(r'how many "([a-z])" in "([a-z]{1,32})"\?|count the letter ([a-z]) in ([a-z]{1,32})')


def _letters(rng: random.Random, lo: int, hi: int, alphabet: str = _LETTERS) -> str:
    return "".join(rng.choice(alphabet) for _ in range(rng.randint(lo, hi)))


def _reverse_make(rng: random.Random) -> tuple[str, str]:
    word = _letters(rng, 3, 8)
    return (f"reverse: {word}" if rng.random() < 0.5 else f"reverse the letters of {word}"), word[::-1]


def _reverse_solve(prompt: str) -> str | None:
    m = _REVERSE.fullmatch(prompt)
    return m[1][::-1] if m else None


def _sort_make(rng: random.Random) -> tuple[str, str]:
    text = _letters(rng, 3, 7, "0123456789" if rng.random() < 0.5 else _LETTERS)
    return (f"sort: {text}" if rng.random() < 0.5 else f"sort ascending: {text}"), "".join(sorted(text))


def _sort_solve(prompt: str) -> str | None:
    m = _SORT.fullmatch(prompt)
    return "".join(sorted(m[1])) if m else None


def _count_make(rng: random.Random) -> tuple[str, str]:
    alphabet = "".join(rng.sample(_LETTERS, rng.randint(2, 5)))
    letter = rng.choice(alphabet)
    text = _letters(rng, 4, 12, alphabet)
    template = 'how many "{c}" in "{s}"?' if rng.random() < 0.5 else "count the letter {c} in {s}"
    return template.format(c=letter, s=text), str(text.count(letter))


def _count_solve(prompt: str) -> str | None:
    m = _COUNT.fullmatch(prompt)
    if not m:
        return None
    letter, text = (m[1], m[2]) if m[1] else (m[3], m[4])
    return str(text.count(letter))


# ---------------------------------------------------------------- babyai: a described view

BABYAI_ENV = "BabyAI-GoToLocal-v0"
COLOURS = ("red", "green", "blue", "purple", "yellow", "grey")
OBJECTS = ("key", "ball", "box", "door", "goal", "lava")
_PLURAL = {"key": "keys", "ball": "balls", "box": "boxes", "door": "doors"}
_ITEM = re.compile(rf"a ({'|'.join(COLOURS)}) ({'|'.join(OBJECTS)})((?: [1-9] (?:left|right))?(?: [1-9] ahead)?)")
_VIEW = re.compile(r"you see: (nothing|.+?)\. (.+\?)")
_QUESTIONS = (
    ("colour", re.compile(rf"which colou?r is the ({'|'.join(OBJECTS)})\?")),
    ("count", re.compile(rf"how many ({'|'.join(_PLURAL.values())}) do you see\?")),
    ("what", re.compile(r"what is at ((?:[1-9] (?:left|right))?(?: ?[1-9] ahead)?)\?")),
    ("ahead", re.compile(rf"how far ahead is the ({'|'.join(COLOURS)}) ({'|'.join(OBJECTS)})\?")),
)


class _Seen(NamedTuple):
    colour: str
    kind: str
    where: str  # "2 left 1 ahead", "3 ahead", "1 right"

    @property
    def ahead(self) -> int:
        m = re.search(r"([1-9]) ahead", self.where)
        return int(m[1]) if m else 0


def _where(dx: int, ahead: int) -> str:
    side = f"{-dx} left" if dx < 0 else f"{dx} right" if dx > 0 else ""
    return " ".join(p for p in (side, f"{ahead} ahead" if ahead else "") if p)


@functools.lru_cache(maxsize=1)
def _babyai_env():
    """One BabyAI env (reset prints silenced), made once and reused; MiniGrid's object and colour names."""
    from ..world.envs import make_adapter

    adapter = make_adapter(BABYAI_ENV)
    return (adapter.make(), *adapter.cell_names())


def babyai_view(seed: int) -> list[_Seen]:
    """The objects in the agent's 7x7 view after a reset with `seed`, nearest rows first, left to right.

    The view ``image[i, j]`` has the agent at (3, 6) looking towards j = 0: i - 3 cells to the
    right, 6 - j cells ahead."""
    env, objects, colours = _babyai_env()
    obs, _ = env.reset(seed=seed)
    image = obs["image"]
    seen = []
    for j in range(6, -1, -1):
        for i in range(image.shape[0]):
            kind, colour = objects.get(int(image[i, j, 0])), colours.get(int(image[i, j, 1]))
            if kind in OBJECTS and colour in COLOURS and (i, j) != (3, 6):
                seen.append(_Seen(colour, kind, _where(i - 3, 6 - j)))
    return seen


def _describe(seen: list[_Seen]) -> str:
    return "you see: " + (", ".join(f"a {s.colour} {s.kind} {s.where}" for s in seen) or "nothing") + "."


def _babyai_questions(seen: list[_Seen]) -> dict[str, list[tuple[str, str]]]:
    """Every (question, answer) the view supports, by kind of question."""
    kinds = Counter(s.kind for s in seen)
    named = Counter((s.colour, s.kind) for s in seen)
    return {
        "colour": [(f"which colour is the {s.kind}?", s.colour) for s in seen if kinds[s.kind] == 1],
        "count": [(f"how many {_PLURAL[k]} do you see?", str(kinds[k])) for k in ("key", "ball", "box")],
        "what": [(f"what is at {s.where}?", s.kind) for s in seen],
        "ahead": [(f"how far ahead is the {s.colour} {s.kind}?", str(s.ahead))
                  for s in seen if named[s.colour, s.kind] == 1],
    }


def _babyai_make(rng: random.Random) -> tuple[str, str]:
    seen = babyai_view(rng.randrange(2**31))
    questions = {kind: qs for kind, qs in _babyai_questions(seen).items() if qs}
    question, answer = rng.choice(questions[rng.choice(sorted(questions))])  # each kind equally often
    return f"{_describe(seen)} {question}", answer


def _babyai_solve(prompt: str) -> str | None:
    m = _VIEW.fullmatch(prompt)
    if not m:
        return None
    items = [] if m[1] == "nothing" else m[1].split(", ")
    parsed = [_ITEM.fullmatch(item) for item in items]
    if not all(parsed):
        return None
    seen = [_Seen(p[1], p[2], p[3].strip()) for p in parsed]
    for kind, pattern in _QUESTIONS:
        q = pattern.fullmatch(m[2])
        if q:
            return _babyai_answer(kind, q, seen)
    return None


def _babyai_answer(kind: str, q: re.Match, seen: list[_Seen]) -> str | None:
    if kind == "count":
        return str(sum(_PLURAL.get(s.kind) == q[1] for s in seen))
    if kind == "colour":
        match = [s for s in seen if s.kind == q[1]]
        return match[0].colour if len(match) == 1 else None
    if kind == "what":
        match = [s for s in seen if s.where == q[1].strip()]
        return match[0].kind if len(match) == 1 else None
    match = [s for s in seen if (s.colour, s.kind) == (q[1], q[2])]
    return str(match[0].ahead) if len(match) == 1 else None


# ---------------------------------------------------------------- the families, answers, checks


class Family(NamedTuple):
    make: Callable[[random.Random], tuple[str, str]]  # rng -> (prompt, answer from the generator's own numbers)
    solve: Callable[[str], str | None]  # prompt -> answer by parsing it; None if it is not this family's


FAMILIES: dict[str, Family] = {
    "arith": Family(_arith_make, _arith_solve),
    "reverse": Family(_reverse_make, _reverse_solve),
    "sort": Family(_sort_make, _sort_solve),
    "count": Family(_count_make, _count_solve),
    "babyai": Family(_babyai_make, _babyai_solve),
}


def _family(task) -> Family:
    if task not in FAMILIES:
        close = difflib.get_close_matches(str(task), list(FAMILIES), n=1)
        hint = f"did you mean {close[0]!r}? " if close else ""
        raise ConfigError(f"unknown task {task!r}; {hint}(task families: {', '.join(FAMILIES)})")
    return FAMILIES[task]


def answer_of(task: str, prompt: str) -> str:
    """The reference answer to a prompt of family `task`, parsed from the prompt alone."""
    solve = _family(task).solve
    answer = solve(prompt.strip()) if isinstance(prompt, str) else None
    if answer is None:
        raise DataError(f"not a {task} prompt: {str(prompt)[:80]!r}")
    return answer


def check(row: dict, answer: str) -> bool:
    """Whether `answer` (surrounding whitespace ignored, any case) answers row["prompt"] of family row["task"]."""
    try:
        reference = answer_of(row.get("task"), row.get("prompt"))
    except DataError:
        return False
    return isinstance(answer, str) and answer.strip().casefold() == reference.casefold()


# ---------------------------------------------------------------- the dataset folder


def is_test_prompt(prompt: str) -> bool:
    """The split rule: a prompt is held out iff the first 8 bytes of sha256(prompt) are 0 mod TEST_SHARE."""
    return int.from_bytes(hashlib.sha256(prompt.encode("utf-8")).digest()[:8], "big") % TEST_SHARE == 0


def check_tasks(tasks) -> list[str]:
    """The family names, validated (unknown → the closest name), in order, without repeats."""
    tasks = [t.strip() for t in tasks if t.strip()] if not isinstance(tasks, str) else [tasks]
    if not tasks:
        raise ConfigError(f"no tasks given; choose from {', '.join(FAMILIES)}")
    for t in tasks:
        _family(t)
    return list(dict.fromkeys(tasks))


def _quotas(total: int, tasks: list[str]) -> dict[str, int]:
    """`total` split evenly over the families (the first ones take the remainder)."""
    return {t: total // len(tasks) + (i < total % len(tasks)) for i, t in enumerate(tasks)}


def family_rows(task: str, n_train: int, n_test: int, seed: int, tick: Callable[[], None] = lambda: None):
    """(train, test) rows of one family: distinct prompts per split, the split decided by the prompt's hash."""
    make = _family(task).make
    rng = random.Random(f"worldloom-instruct:{seed}:{task}")
    want = {False: n_train, True: n_test}
    got: dict[bool, dict[str, str]] = {False: {}, True: {}}
    stale = 0
    while len(got[False]) < n_train or len(got[True]) < n_test:
        prompt, answer = make(rng)
        held_out = is_test_prompt(prompt)
        split = got[held_out]
        if len(split) >= want[held_out] or prompt in split or len(prompt) > MAX_PROMPT:
            stale += 1
            if stale >= _STALE:
                raise DataError(f"task {task} ran out of distinct prompts after {len(got[False]):,} training and "
                                f"{len(got[True]):,} test rows; ask for fewer (--n, --test-n)")
            continue
        split[prompt] = answer
        stale = 0
        tick()
    return tuple([{"task": task, "prompt": p, "response": a} for p, a in got[s].items()] for s in (False, True))


def _check_out(out: Path, marker: str = MARKER, verb: str = "worldloom data instruct") -> None:
    """Refuse an output path that is a file, or a non-empty folder that is not an earlier output of `verb`."""
    if out.exists() and not out.is_dir():
        raise DataError(f"--out {out} is a file; give a folder")
    if out.is_dir() and any(p for p in out.iterdir() if not p.name.startswith(".")):
        try:
            ours = json.loads((out / "meta.json").read_text()).get(marker) is not None
        except (OSError, ValueError, AttributeError):
            ours = False
        if not ours:
            raise DataError(f"--out {out} holds files that are not a `{verb}` output; "
                            "choose a new or empty folder")


def _jsonl(rows: list[dict]) -> str:
    return "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)


def make_instruct(tasks: list[str], n: int, out: Path, seed: int = 0, test_n: int | None = None,
                  progress: bool = False) -> dict:
    """Write train.jsonl, test.jsonl, prompts.jsonl, pretrain.txt and meta.json into `out`; the meta."""
    from tqdm.auto import tqdm

    tasks = check_tasks(tasks)
    test_n = max(100, n // 10) if test_n is None else test_n
    for name, value in (("n", n), ("test_n", test_n)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ConfigError(f"{name} must be a positive integer, got {value!r}")
    out = Path(out)
    _check_out(out)
    train, test = [], []
    train_q, test_q = _quotas(n, tasks), _quotas(test_n, tasks)
    with tqdm(total=n + test_n, desc="instruct", unit="row", disable=not progress, dynamic_ncols=True) as bar:
        for task in tasks:
            bar.set_postfix_str(task)
            rows = family_rows(task, train_q[task], test_q[task], seed, lambda: bar.update(1))
            train += rows[0]
            test += rows[1]
    rng = random.Random(f"worldloom-instruct:{seed}:shuffle")
    rng.shuffle(train)
    rng.shuffle(test)
    prompts = [{"task": r["task"], "prompt": r["prompt"]} for r in train[:PROMPTS_MAX]]
    meta = _meta(tasks, seed, {"train": train, "test": test, "prompts": prompts})
    _write(out, {"train.jsonl": _jsonl(train), "test.jsonl": _jsonl(test), "prompts.jsonl": _jsonl(prompts),
                 "pretrain.txt": "".join(render_prompt(r["prompt"]) + r["response"] + STOP + "\n" for r in train)}, meta)
    return meta


def _meta(tasks: list[str], seed: int, splits: dict[str, list[dict]]) -> dict:
    return {
        MARKER: 1,
        "tasks": tasks,
        "seed": seed,
        "format": PROMPT_FORMAT,
        "stop": STOP,
        "counts": {name: {t: Counter(r["task"] for r in rows)[t] for t in tasks} for name, rows in splits.items()},
        "rows": {name: len(rows) for name, rows in splits.items()},
        "babyai_env": BABYAI_ENV if "babyai" in tasks else None,
        "split": (f"by construction: a prompt is in the test split iff the first 8 bytes of sha256(prompt) "
                  f"are 0 mod {TEST_SHARE}; prompts are distinct within a split, so no test prompt is in "
                  "train.jsonl, prompts.jsonl or pretrain.txt (which hold training rows only)"),
        "files": {"train": "train.jsonl", "test": "test.jsonl", "prompts": "prompts.jsonl", "pretrain": "pretrain.txt"},
    }


def _write(out: Path, files: dict[str, str], meta: dict) -> None:
    """Each file atomically; meta.json removed first and written last, so it marks a complete output."""
    out.mkdir(parents=True, exist_ok=True)
    remove_stale_temporaries(out)
    (out / "meta.json").unlink(missing_ok=True)
    for name, text in files.items():
        atomic_write_text(out / name, text)
    write_json(out / "meta.json", meta)
