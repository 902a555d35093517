"""`worldloom tune prefs RUN data.path=PROMPTS.jsonl --samples K --out DIR`: preference pairs from a
run's own samples, labelled by the tasks' checkers.

Each prompt (a row naming a task) is answered K times at ``prefs.temperature``; the checker
marks each answer right or wrong. Every distinct wrong answer is paired with a right one (chosen)
as a row {"prompt", "task", "chosen", "rejected", "margin"} (margin: checker score of chosen minus
rejected, 1.0). A prompt the run never answers right gets the checker's reference answer as
chosen when ``prefs.reference`` is true (marked ``"source": "reference"``); a prompt answered
right every time gives no pair (nothing to prefer). Empty answers cannot be a row (the reader
refuses empty strings) and are counted apart. ``DIR/train.jsonl`` and ``DIR/meta.json`` (counts,
sample accuracy, settings) are written at the end, each atomically.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from tqdm import tqdm

from ..config import apply_overrides, from_dict
from ..errors import ConfigError, DataError
from ..io import atomic_write_text, read_json, write_json
from ..run import load_run
from .common import answers

MARKER = "worldloom_prefs"


@dataclass
class PrefsConfig:
    temperature: float = 1.0  # sampling temperature of the K answers
    max_new_tokens: int = 32
    seed: int = 0
    max_prompts: int = 0  # 0 = every prompt of the file
    reference: bool = True  # a prompt never answered right: the checker's reference answer is chosen

    def __post_init__(self):
        if not 0 < self.temperature <= 10:
            raise ConfigError(f"prefs.temperature must be in (0, 10], got {self.temperature}")
        if self.max_new_tokens < 1 or self.max_prompts < 0:
            raise ConfigError("prefs.max_new_tokens must be >= 1 and prefs.max_prompts >= 0")


def parse(overrides: list[str]) -> tuple[str, PrefsConfig]:
    """(data.path, PrefsConfig) from `data.path=... prefs.key=...` overrides; anything else is refused."""
    data = apply_overrides({}, overrides)
    given = data.pop("data", {})
    if not isinstance(given, dict) or set(given) - {"path"}:
        raise ConfigError("tune prefs reads data.path only (the prompts file)")
    path = given.get("path", "")
    unknown = [k for k in data if k != "prefs"]
    if unknown:
        raise ConfigError(f"unknown key {unknown[0]!r} for tune prefs (keys: data.path, prefs.temperature, "
                          "prefs.max_new_tokens, prefs.seed, prefs.max_prompts, prefs.reference)")
    if not path:
        raise ConfigError("give the prompts to sample: worldloom tune prefs RUN data.path=PROMPTS.jsonl --out DIR")
    return str(path), from_dict(PrefsConfig, data.get("prefs", {}), prefix="prefs.")


def _check_out(out: Path) -> None:
    if out.exists() and not out.is_dir():
        raise ConfigError(f"--out {out} is a file, not a folder")
    if out.is_dir() and any(out.iterdir()) and not ((out / "meta.json").is_file() and MARKER in read_json(out / "meta.json")):
        raise ConfigError(f"--out folder {out} is not empty and is not a previous `tune prefs` output; pick another folder")


def pairs_of(row: dict, got: list[str], right: list[bool], reference: str | None) -> list[dict]:
    """The preference rows of one prompt from its K answers and their marks."""
    good = [a for a, ok in zip(got, right) if ok and a.strip()]
    src = {}
    if not good and reference is not None:
        good, src = [reference], {"source": "reference"}
    bad = list(dict.fromkeys(a for a, ok in zip(got, right) if not ok and a.strip()))
    base = {"prompt": row["prompt"], "task": row["task"]}
    return [{**base, "chosen": good[i % len(good)], "rejected": b, "margin": 1.0, **src} for i, b in enumerate(bad)] if good else []


def sample_prefs(run_dir: Path, overrides: list[str], samples: int = 4, out: str | None = None, progress: bool = True,
                 log=print) -> dict:
    from .data import read_prompts
    from .tasks import answer_of, check

    if not out:
        raise ConfigError("give the output folder: worldloom tune prefs RUN data.path=PROMPTS.jsonl --out DIR")
    path, pc = parse(overrides)
    out = Path(out)
    _check_out(out)
    run = load_run(run_dir)
    if run.is_world:
        raise ConfigError(f"{run_dir} is a world run; tune prefs samples text answers (world runs: trajectory pairs are not built yet)")
    rows = [r for r in read_prompts(path) if r.get("task")]
    rows = rows[: pc.max_prompts] if pc.max_prompts else rows
    if not rows:
        raise DataError(f"{path}: no row names a task (a \"task\" key): the checker cannot label answers")
    prompts = [r["prompt"] for r in rows for _ in range(samples)]
    with tqdm(total=len(prompts), desc="sample", unit="answer", disable=not progress or None) as bar:
        got = answers(run.model, run.tokenizer, run.cfg, prompts, pc.temperature, pc.seed, max_new_tokens=pc.max_new_tokens,
                      progress=lambda n: bar.update(n - bar.n))
    pairs, stats = [], {"prompts": len(rows), "samples": samples, "all_right": 0, "none_right": 0, "empty_answers": 0, "right": 0}
    for i, row in enumerate(rows):
        g = got[i * samples : (i + 1) * samples]
        ok = [bool(check(row, a)) for a in g]
        stats["right"] += sum(ok)
        stats["empty_answers"] += sum(not a.strip() for a in g)
        stats["all_right"] += all(ok)
        stats["none_right"] += not any(ok)
        pairs += pairs_of(row, g, ok, answer_of(row["task"], row["prompt"]) if pc.reference else None)
    meta = {MARKER: 1, "run": str(run_dir), "prompts_file": path, "pairs": len(pairs),
            "prompts_with_pairs": len({p["prompt"] for p in pairs}), "reference_chosen": sum("source" in p for p in pairs),
            "sample_accuracy": stats.pop("right") / len(prompts), **stats, "temperature": pc.temperature, "seed": pc.seed}
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out / "train.jsonl", "".join(json.dumps(p) + "\n" for p in pairs))
    write_json(out / "meta.json", meta)
    log(f"{len(pairs)} pairs from {meta['prompts_with_pairs']} of {len(rows)} prompts ({samples} samples each, "
        f"{meta['sample_accuracy']:.1%} answered right; {meta['reference_chosen']} pairs chose the reference answer) -> {out}/train.jsonl")
    return meta
