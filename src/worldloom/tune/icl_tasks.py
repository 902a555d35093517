"""Procedural in-context-learning data (`worldloom data icl`): string rules to infer from examples.

A *family* is one rule: one or two string primitives applied in order, each with its parameters
drawn fresh, named so the name alone defines it, e.g. ``rotate:2>suffix:q`` (rotate left by 2,
then append ``q``). Its *kind* is the same without parameters (``rotate>suffix``). Primitives act
on a word of 3-5 lowercase letters:

    reverse      abcd -> dcba              evens        abcde -> ace (drop every other letter)
    rotate:K     left by K in {1, 2}        double       abc -> aabbcc
    suffix:C     append the letter C        prefix:C     prepend the letter C

Every primitive moves or copies letters (none computes new ones, as a letter shift would): a
small model learns such rules from a few minutes of episodes, and they compose.

Held-out compositions: the kinds whose two primitives form one of the unordered pairs in
``HELD_OUT`` (both orders) are test kinds; every other single primitive and ordered pair is a
training kind (minus ``double>evens``, the identity). So every primitive is trained, alone and in
other pairs, but a test family's pair of primitives never occurs together in training; the tests
check, by enumerating every training kind's parameters, that no training rule computes a test
family's answers.

The model reads an episode: k solved examples of one fresh family, one line ``word=answer`` each
(``FORMAT``; the preset ``icl`` sets ``tune.prompt_format`` to it: fewer tokens per example than the
default ``Q: …\\nA: …``, so 8 shots fit a 128-token context), a blank line between episodes. ``train.txt`` holds training episodes (text-recipe food: preset ``icl``);
``test.jsonl`` holds rows ``{"family", "kind", "prompt", "response"}`` of held-out families,
``seen.jsonl`` the same of fresh training-kind families, both read by ``worldloom eval --icl``.
"""

from __future__ import annotations

import random
import string
from pathlib import Path
from typing import Callable, NamedTuple

from ..errors import ConfigError, DataError
from .data import render_prompt
from .tasks import _check_out, _jsonl, _write

MARKER = "worldloom_icl"  # meta.json key that marks a folder as make_icl's output
LETTERS = string.ascii_lowercase
HELD_OUT = (("prefix", "suffix"), ("reverse", "double"), ("rotate", "evens"), ("suffix", "double"))
DEGENERATE = {("double", "evens")}  # compositions that are the identity, never a family
MAX_EXAMPLES = 10  # examples per training episode are drawn from 1..MAX_EXAMPLES
FORMAT, STOP = "{prompt}=", "\n"  # a solved example reads "abcd=dcba\n" (preset icl sets tune.prompt_format to FORMAT)


class Primitive(NamedTuple):
    params: tuple[str, ...]  # every value its parameter takes ("" = it has none)
    apply: Callable[[str, str], str]  # (word, parameter) -> word


PRIMITIVES: dict[str, Primitive] = {
    "reverse": Primitive(("",), lambda w, _: w[::-1]),
    "rotate": Primitive(("1", "2"), lambda w, k: w[int(k):] + w[: int(k)]),
    "suffix": Primitive(tuple(LETTERS), lambda w, c: w + c),
    "prefix": Primitive(tuple(LETTERS), lambda w, c: c + w),
    "evens": Primitive(("",), lambda w, _: w[::2]),
    "double": Primitive(("",), lambda w, _: "".join(c + c for c in w)),
}


def _kinds() -> tuple[list[tuple[str, ...]], list[tuple[str, ...]]]:
    """(training kinds, test kinds) as tuples of primitive names, in a fixed order."""
    held = {frozenset(p) for p in HELD_OUT}
    train, test = [(p,) for p in PRIMITIVES], []
    for a in PRIMITIVES:
        for b in PRIMITIVES:
            if a != b and (a, b) not in DEGENERATE:
                (test if frozenset((a, b)) in held else train).append((a, b))
    return train, test


TRAIN_KINDS, TEST_KINDS = _kinds()


def family_name(steps: list[tuple[str, str]]) -> str:
    """``[("rotate", "2"), ("suffix", "q")]`` -> ``rotate:2>suffix:q`` (a step without a parameter: its name)."""
    return ">".join(f"{p}:{v}" if v else p for p, v in steps)


def parse_family(name: str) -> list[tuple[str, str]]:
    """The steps of a family name; ConfigError for anything that is not one."""
    steps = []
    for part in str(name).split(">"):
        prim, _, value = part.partition(":")
        if prim not in PRIMITIVES or value not in PRIMITIVES[prim].params:
            raise ConfigError(f"not an icl family: {name!r} (steps like rotate:2>suffix:q; primitives {', '.join(PRIMITIVES)})")
        steps.append((prim, value))
    return steps


def apply_family(name: str, word: str) -> str:
    for prim, value in parse_family(name):
        word = PRIMITIVES[prim].apply(word, value)
    return word


def kind_of(name: str) -> str:
    return ">".join(p for p, _ in parse_family(name))


def draw_family(kind: tuple[str, ...], rng: random.Random) -> str:
    return family_name([(p, rng.choice(PRIMITIVES[p].params)) for p in kind])


def _words(rng: random.Random, n: int) -> list[str]:
    """`n` distinct words of 3-5 letters."""
    out: dict[str, None] = {}
    while len(out) < n:
        out["".join(rng.choice(LETTERS) for _ in range(rng.randint(3, 5)))] = None
    return list(out)


def episode(kind: tuple[str, ...], n: int, rng: random.Random) -> str:
    """`n` solved examples of one fresh family of `kind`, as the model reads them, then a blank line."""
    family = draw_family(kind, rng)
    return "".join(render_prompt(w, FORMAT) + apply_family(family, w) + STOP for w in _words(rng, n)) + "\n"


def family_rows(kinds: list[tuple[str, ...]], per_kind: int, rows: int, rng: random.Random) -> list[dict]:
    """`rows` rows of each of up to `per_kind` distinct families of every kind (fewer where a kind has fewer)."""
    out = []
    for kind in kinds:
        space = 1
        for p in kind:
            space *= len(PRIMITIVES[p].params)
        families: dict[str, None] = {}
        while len(families) < min(per_kind, space):
            families[draw_family(kind, rng)] = None
        for family in families:
            out += [{"family": family, "kind": ">".join(kind), "prompt": w, "response": apply_family(family, w)}
                    for w in _words(rng, rows)]
    return out


def make_icl(out: Path, n: int = 60000, per_kind: int = 4, rows: int = 24, seed: int = 0) -> dict:
    """Write train.txt (`n` episodes), test.jsonl, seen.jsonl and meta.json into `out`; the meta."""
    for key, value, lo in (("n", n, 1), ("per_kind", per_kind, 1), ("rows", rows, 2)):
        if isinstance(value, bool) or not isinstance(value, int) or value < lo:
            raise ConfigError(f"{key} must be an integer >= {lo}, got {value!r}")
    out = Path(out)
    _check_out(out, MARKER, "icl")
    rng = random.Random(f"worldloom-icl:{seed}")
    text = "".join(episode(rng.choice(TRAIN_KINDS), rng.randint(1, MAX_EXAMPLES), rng) for _ in range(n))
    test = family_rows(TEST_KINDS, per_kind, rows, rng)
    seen = family_rows(TRAIN_KINDS, 1, rows, rng)
    meta = {
        MARKER: 1, "seed": seed, "episodes": n, "format": FORMAT, "stop": STOP,
        "train_kinds": [">".join(k) for k in TRAIN_KINDS], "test_kinds": [">".join(k) for k in TEST_KINDS],
        "held_out_pairs": [list(p) for p in HELD_OUT],
        "rows": {"test": len(test), "seen": len(seen)},
        "families": {"test": len({r["family"] for r in test}), "seen": len({r["family"] for r in seen})},
        "split": "held-out compositions: a test kind's two primitives (either order) never occur together in "
                 "train.txt; every primitive is trained alone and in other pairs",
        "files": {"train": "train.txt", "test": "test.jsonl", "seen": "seen.jsonl"},
    }
    if not test:
        raise DataError("no test families (HELD_OUT is empty)")
    _write(out, {"train.txt": text, "test.jsonl": _jsonl(test), "seen.jsonl": _jsonl(seen)}, meta)
    return meta
