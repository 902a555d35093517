"""`worldloom eval RUN --icl FILE --shots 0,1,4,8`: accuracy with k solved examples in the prompt.

Every row of FILE (instruction rows: ``prompt`` and ``response``) names its family, ``family`` or
else ``task`` (so `worldloom data instruct`'s test.jsonl works as well as `worldloom data icl`'s).
Queries are drawn evenly over the families (``--queries``, fixed ``--seed``); each query gets
``max(shots)`` examples drawn from the OTHER rows of its family (never a row with the query's
prompt), and the prompt for k shots is the first k of them, each read as the model reads a solved
turn (``tune.prompt_format`` around the prompt, the response, ``tune.stop``), then the query. So
every k sees the same queries, and the k=4 examples are the first four of the k=8 ones.

The answer is greedy, cut at ``tune.stop`` (`tune.common.answers`; at most ``ANSWER_SLACK``
tokens longer than the longest reference answer: a longer one is wrong anyway), and right when the
family's checker accepts it (`tune.tasks.check`, for instruct families) or, for any other family, when it
equals the row's response (surrounding whitespace ignored). A prompt longer than the model's
context keeps its last tokens (the query); how many were so cut is reported per k.
"""

from __future__ import annotations

import json
import random
from typing import Callable, NamedTuple

from ..errors import ConfigError, DataError
from .data import render_prompt

MAX_SHOTS = 64
ANSWER_SLACK = 4  # answers stop at tune.stop or this many tokens past the longest reference answer (longer is wrong)


class Query(NamedTuple):
    row: dict  # the row to answer
    examples: list[dict]  # max(shots) other rows of its family; k shots use the first k


def parse_shots(text: str) -> list[int]:
    """``"0,1,4,8"`` -> [0, 1, 4, 8] (sorted, without repeats); ConfigError otherwise."""
    try:
        shots = sorted({int(s) for s in str(text).split(",")})
    except ValueError:
        raise ConfigError(f"--shots takes comma-separated whole numbers like 0,1,4,8, got {text!r}") from None
    if shots[0] < 0 or shots[-1] > MAX_SHOTS:
        raise ConfigError(f"--shots must lie in 0..{MAX_SHOTS}, got {text!r}")
    return shots


def family_of(row: dict) -> str | None:
    name = row.get("family", row.get("task"))
    return name if isinstance(name, str) and name.strip() else None


def read_icl(path, fmt: str, stop: str) -> dict[str, list[dict]]:
    """The rows of FILE by family (in file order), each a solved example: a prompt (or chat "messages") and a
    response without the stop string. Unlike an instruction file, one prompt may recur in another family."""
    from .data import _chat_row, _rows, _text

    hint = 'an icl row has "family" (or "task"), "prompt" and "response"'
    by: dict[str, list[dict]] = {}
    for where, row in _rows(path, hint):
        if "messages" in row:
            row = _chat_row(row, where, fmt, stop)
        else:
            row = dict(row, prompt=_text(row, "prompt", where, hint), response=_text(row, "response", where, hint))
        if stop in row["response"]:
            raise DataError(f"{where}: the response contains the stop string {stop!r} (an answer is cut there)")
        if family_of(row) is None:
            raise DataError(f'{where}: no family (a "family" or "task" key; examples are drawn from the query\'s family)')
        by.setdefault(family_of(row), []).append(row)
    return by


def plan(by_family: dict[str, list[dict]], max_shots: int, queries: int, seed: int = 0) -> list[Query]:
    """Queries spread evenly over the families, each with `max_shots` examples of its own family."""
    short = [f"{f} ({len(r)})" for f, r in by_family.items() if len(r) <= max_shots]
    if short:
        raise DataError(f"{max_shots} shots need {max_shots + 1} rows per family; too few in: {', '.join(short[:5])}")
    rng = random.Random(f"worldloom-icl-eval:{seed}")
    families = sorted(by_family)
    out = []
    for i, fam in enumerate(families):
        rows = by_family[fam]
        quota = min(len(rows), queries // len(families) + (i < queries % len(families)))
        for q in rng.sample(range(len(rows)), quota):
            others = [r for r in rows if r["prompt"] != rows[q]["prompt"]]
            if len(others) < max_shots:
                raise DataError(f"family {fam}: {len(others)} rows with another prompt than {rows[q]['prompt'][:40]!r}; "
                                f"{max_shots} shots need {max_shots}")
            out.append(Query(rows[q], rng.sample(others, max_shots)))
    return out


def _turn(row: dict, fmt: str) -> str:
    """A row's prompt as the model reads it (a chat row's was rendered when it was read)."""
    return row["prompt"] if row.get("rendered") else render_prompt(row["prompt"], fmt)


def icl_prompt(q: Query, k: int, fmt: str, stop: str) -> str:
    """The first k examples, solved, then the query."""
    return "".join(_turn(e, fmt) + e["response"] + stop for e in q.examples[:k]) + _turn(q.row, fmt)


def is_right(row: dict, answer: str) -> bool:
    """The family's checker for instruct families, else the answer equals the response."""
    from .tasks import FAMILIES, check

    if row.get("task") in FAMILIES and "family" not in row:
        return check(row, answer)
    return isinstance(answer, str) and answer.strip() == row["response"].strip()


def _rates(oks: list[bool], groups: list[str]) -> dict[str, float]:
    per: dict[str, list[bool]] = {}
    for g, ok in zip(groups, oks):
        per.setdefault(g, []).append(ok)
    return {g: sum(v) / len(v) for g, v in sorted(per.items())}


def icl_curve(queries: list[Query], shots: list[int], answer: Callable[[list[str]], list[str]], fmt: str, stop: str,
              length: Callable[[str], int] | None = None, context: int | None = None) -> dict:
    """Accuracy per shot count, overall / per family / per kind (rows with a "kind"), from `answer` (texts -> answers)."""
    fams = [family_of(q.row) for q in queries]
    kinds = [q.row.get("kind") for q in queries]
    out = {"shots": shots, "queries": len(queries), "families": len(set(fams)), "accuracy": {}, "per_family": {},
           "per_kind": {}, "over_context": {}}
    for k in shots:
        texts = [icl_prompt(q, k, fmt, stop) for q in queries]
        oks = [is_right(q.row, a) for q, a in zip(queries, answer(texts))]
        out["accuracy"][str(k)] = sum(oks) / max(len(oks), 1)
        for fam, acc in _rates(oks, fams).items():
            out["per_family"].setdefault(fam, {})[str(k)] = acc
        if all(kinds):
            for kind, acc in _rates(oks, kinds).items():
                out["per_kind"].setdefault(kind, {})[str(k)] = acc
        if length and context:
            out["over_context"][str(k)] = sum(length(t) > context for t in texts)
    return out


def _table(res: dict) -> str:
    """Shots across, accuracy down: all, then per kind (or per family)."""
    groups = res["per_kind"] or res["per_family"]
    width = max([len(g) for g in groups] + [12])
    head = " " * width + "".join(f"{f'{k} shots':>10}" for k in res["shots"])
    lines = [head, f"{'all':<{width}}" + "".join(f"{res['accuracy'][str(k)]:>10.1%}" for k in res["shots"])]
    lines += [f"{g:<{width}}" + "".join(f"{accs[str(k)]:>10.1%}" for k in res["shots"]) for g, accs in groups.items()]
    return "\n".join(lines)


def evaluate_icl(args, run) -> int:
    """The CLI: read FILE, plan the queries, answer them greedily at every k, print a table or JSON."""
    from tqdm import tqdm

    from .common import answers

    shots = parse_shots(args.shots)
    fmt, stop = run.cfg.tune.prompt_format, run.cfg.tune.stop
    queries = plan(read_icl(args.icl, fmt, stop), shots[-1], args.queries, args.seed)
    limit = max(len(run.tokenizer.encode(q.row["response"])) for q in queries) + ANSWER_SLACK
    with tqdm(total=len(queries) * len(shots), desc=f"icl {args.run}", unit="query", disable=args.json or None,
              leave=False) as bar:
        def answer(texts: list[str]) -> list[str]:
            got = answers(run.model, run.tokenizer, run.cfg, texts, rendered=True, batch=args.batch_size, max_new_tokens=limit)
            bar.update(len(texts))
            return got

        res = icl_curve(queries, shots, answer, fmt, stop, lambda t: len(run.tokenizer.encode(t)), run.cfg.model.context)
    res = {"run": str(args.run), "file": args.icl, "seed": args.seed, **res}
    if args.json:
        print(json.dumps(res, indent=2))
        return 0
    cut = {k: n for k, n in res["over_context"].items() if n}
    print(f"{args.run}: in-context accuracy on {res['queries']} queries of {res['families']} families in {args.icl} "
          f"(greedy, exact answers; seed {args.seed})" + (f"; prompts over the context, cut: {cut}" if cut else ""))
    print(_table(res))
    return 0
