"""Instruction, preference and prompt JSONL files: read, validated row by row, one-line errors.

A file has one JSON object per line (blank lines skipped). Every bad row is a ``DataError`` whose
message starts with ``FILE:LINE: `` (1-based), e.g. ``data/train.jsonl:17: "response" is empty``;
file-level problems (missing, empty) start with ``FILE: ``. Nothing is evaluated: rows are JSON.

The default chat template (``PROMPT_FORMAT``, ``STOP``): the model sees ``Q: <prompt>\\nA: `` and
answers with the response followed by ``STOP``; a response is the text after the prompt up to
(and including) the stop string, which is why a response may not contain it.
The schemas and examples are in docs/tuning.md.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

from ..errors import ConfigError, DataError

__all__ = ["DataError", "PROMPT_FORMAT", "STOP", "read_instructions", "read_preferences", "read_prompts",
           "render_prompt", "render_turn"]

PROMPT_FORMAT = "Q: {prompt}\nA: "
STOP = "\n"
ROLES = ("user", "assistant", "system")
_INSTRUCTION_KEYS = 'an instruction row has "prompt" and "response", or chat "messages"'
_PREFERENCE_KEYS = 'a preference row has "prompt", "chosen" and "rejected"'
_PROMPT_KEYS = 'a prompt row has "prompt"'


def render_prompt(prompt: str, fmt: str = PROMPT_FORMAT) -> str:
    """The text the model sees before its response: `fmt` with ``{prompt}`` replaced (no other fields)."""
    if not isinstance(fmt, str) or fmt.count("{prompt}") != 1:
        raise ConfigError(f"a prompt format must contain {{prompt}} exactly once, got {fmt!r}")
    return fmt.replace("{prompt}", prompt)


def render_turn(role: str, content: str, fmt: str = PROMPT_FORMAT, stop: str = STOP) -> str:
    """One chat turn as the model reads it: a user's through `fmt`, an assistant's followed by `stop`,
    a system's (or developer's) on a line of its own. A conversation is its turns joined."""
    if role == "user":
        return render_prompt(content, fmt)
    return content + (stop if role == "assistant" else "\n")


def _kind(value) -> str:
    """The JSON name of a parsed value's type."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, (int, float)):
        return "number"
    return {str: "string", list: "array", dict: "object"}.get(type(value), type(value).__name__)


def _rows(path, hint: str) -> list[tuple[str, dict]]:
    """(``FILE:LINE``, object) for every non-blank line; DataError for anything that is not a JSON object."""
    path = Path(path)
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        raise DataError(f"{path}: no such file") from None
    except IsADirectoryError:
        raise DataError(f"{path}: is a folder, expected a JSONL file (one JSON object per line)") from None
    rows = []
    for number, line in enumerate(raw.split(b"\n"), 1):
        where = f"{path}:{number}"
        try:
            text = line.decode("utf-8-sig" if number == 1 else "utf-8")
        except UnicodeDecodeError as e:
            raise DataError(f"{where}: not UTF-8 text (byte 0x{line[e.start]:02x} at column {e.start + 1})") from None
        if not text.strip():
            continue
        try:
            row = json.loads(text)
        except json.JSONDecodeError as e:
            raise DataError(f"{where}: not JSON ({e.msg} at column {e.colno})") from None
        except RecursionError:
            raise DataError(f"{where}: not usable JSON (nested too deeply)") from None
        if not isinstance(row, dict):
            raise DataError(f"{where}: a JSON {_kind(row)}, expected an object ({hint})")
        rows.append((where, row))
    if not rows:
        raise DataError(f"{path}: no rows (the file is empty or blank; {hint})")
    return rows


def _text(row: dict, key: str, where: str, hint: str, optional: bool = False) -> str | None:
    """row[key] as a non-blank string; None when `optional` and absent."""
    if key not in row:
        if optional:
            return None
        raise DataError(f'{where}: missing key "{key}" ({hint})')
    value = row[key]
    if not isinstance(value, str):
        raise DataError(f'{where}: "{key}" is a {_kind(value)}, expected a string')
    if not value.strip():
        raise DataError(f'{where}: "{key}" is empty')
    return value


def _check_length(where: str, n: int, what: str, max_chars: int) -> None:
    if n > max_chars:
        raise DataError(f"{where}: the row is {n:,} characters ({what}), over the limit of {max_chars:,}")


def _check_max_chars(max_chars) -> None:
    if isinstance(max_chars, bool) or not isinstance(max_chars, int) or max_chars < 1:
        raise ConfigError(f"max_chars must be a positive integer, got {max_chars!r}")


def _chat_row(row: dict, where: str, fmt: str, stop: str) -> dict:
    """A chat row rendered: every turn before the last as the prompt, the last (assistant) as the response."""
    if "prompt" in row or "response" in row:
        raise DataError(f'{where}: give either "messages" or "prompt"/"response", not both')
    messages = row["messages"]
    if not isinstance(messages, list) or not messages:
        raise DataError(f'{where}: "messages" is {"empty" if messages == [] else "a " + _kind(messages)}, '
                        'expected a list of {"role", "content"} objects')
    parts = []
    for i, m in enumerate(messages):
        at = f"{where}: messages[{i}]"
        if not isinstance(m, dict):
            raise DataError(f'{at} is a {_kind(m)}, expected an object with "role" and "content"')
        role = _text(m, "role", at, 'a message has "role" and "content"')
        if role not in ROLES:
            raise DataError(f'{at}: "role" is {role!r}, expected one of {", ".join(ROLES)}')
        content = _text(m, "content", at, 'a message has "role" and "content"')
        if i < len(messages) - 1:
            parts.append(render_turn(role, content, fmt, stop))
    if messages[-1]["role"] != "assistant":
        raise DataError(f'{where}: the last message is the {messages[-1]["role"]}\'s, expected the assistant\'s (the response)')
    if not any(m["role"] == "user" for m in messages):
        raise DataError(f"{where}: no user message before the assistant's")
    return {**row, "prompt": "".join(parts), "response": messages[-1]["content"], "rendered": True}


def _check_task(row: dict, where: str) -> None:
    _text(row, "task", where, "", optional=True)


def read_instructions(path, fmt: str = PROMPT_FORMAT, stop: str = STOP, max_chars: int = 4096) -> list[dict]:
    """Instruction rows: {"prompt", "response", ...} as they are; chat {"messages": [...]} rendered
    (prompt = the turns before the last through `fmt`/`stop`, response = the last, "rendered": True)."""
    render_prompt("", fmt)
    _check_max_chars(max_chars)
    out, seen = [], {}
    for where, row in _rows(path, _INSTRUCTION_KEYS):
        if "messages" in row:
            item = _chat_row(row, where, fmt, stop)
        else:
            item = dict(row, prompt=_text(row, "prompt", where, _INSTRUCTION_KEYS),
                        response=_text(row, "response", where, _INSTRUCTION_KEYS))
        _check_task(row, where)
        response = item["response"]
        if stop and stop in response:
            raise DataError(f"{where}: the response contains the stop string {stop!r} (it would be cut there when sampling)")
        _check_length(where, len(item["prompt"]) + len(response), "prompt + response", max_chars)
        key = (bool(item.get("rendered")), item["prompt"])
        first = seen.setdefault(key, (where, response))
        if first[1] != response:
            raise DataError(f"{where}: the same prompt as line {_line(first[0])} with a different response")
        out.append(item)
    return out


def _line(where: str) -> str:
    return where.rsplit(":", 1)[1]


def _check_margin(row: dict, where: str) -> None:
    if "margin" not in row:
        return
    m = row["margin"]
    if isinstance(m, bool) or not isinstance(m, (int, float)):
        raise DataError(f'{where}: "margin" is a {_kind(m)}, expected a number')
    if not math.isfinite(m):
        raise DataError(f'{where}: "margin" is {m}, expected a finite number')


def read_preferences(path, max_chars: int = 4096) -> list[dict]:
    """Preference rows {"prompt", "chosen", "rejected"} (+ optional "task", "margin", others kept)."""
    _check_max_chars(max_chars)
    out, labels = [], {}
    for where, row in _rows(path, _PREFERENCE_KEYS):
        prompt, chosen, rejected = (_text(row, k, where, _PREFERENCE_KEYS) for k in ("prompt", "chosen", "rejected"))
        if chosen == rejected:
            raise DataError(f'{where}: "chosen" and "rejected" are the same text')
        _check_task(row, where)
        _check_margin(row, where)
        _check_length(where, len(prompt) + max(len(chosen), len(rejected)), "prompt + longest answer", max_chars)
        seen = labels.setdefault(prompt, {"chosen": {}, "rejected": {}})
        for key, other in (("chosen", "rejected"), ("rejected", "chosen")):
            if row[key] in seen[other]:
                raise DataError(f'{where}: "{key}" is the "{other}" of line {_line(seen[other][row[key]])} '
                                "for the same prompt (conflicting labels)")
        seen["chosen"].setdefault(chosen, where)
        seen["rejected"].setdefault(rejected, where)
        out.append(dict(row))
    return out


def read_prompts(path, max_chars: int = 4096) -> list[dict]:
    """Rows with at least a "prompt" (instruction and test files are prompt files too; other keys kept)."""
    _check_max_chars(max_chars)
    out = []
    for where, row in _rows(path, _PROMPT_KEYS):
        prompt = _text(row, "prompt", where, _PROMPT_KEYS)
        _check_task(row, where)
        _check_length(where, len(prompt), "prompt", max_chars)
        out.append(dict(row))
    return out
