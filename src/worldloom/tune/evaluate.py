"""`worldloom eval RUN --tasks FILE [--baseline RUN]`: exact-answer accuracy on checkable task rows.

Every row of FILE that names a task (``worldloom.tune.tasks``) is answered greedily (its prompt
through the run's ``tune.prompt_format``, cut at ``tune.stop``) and scored by the task's checker.
With ``--baseline``, the other run answers the same rows and the win-rate is
(wins + ties / 2) / rows, a win being a row this run gets right and the baseline wrong.
Any text run can be scored so (a base run trained on the tasks' text too). Without ``--tasks``, a
tuned run reports what its run folder holds: the last held-out loss and ``tune_eval.json``.
"""

from __future__ import annotations

import json
from pathlib import Path

from tqdm import tqdm

from ..errors import DataError
from ..io import read_json
from ..run import METRICS, load_run
from ..train.plots import read_metrics
from .common import task_accuracy


def _scored(run, rows: list[dict], name: str, quiet: bool) -> dict:
    with tqdm(total=len(rows), desc=f"answer {name}", unit="row", disable=quiet or None, leave=False) as bar:
        return task_accuracy(run.model, run.tokenizer, run.cfg, rows, progress=lambda n: bar.update(n - bar.n))


def win_rate(mine: list[bool], theirs: list[bool]) -> dict:
    wins = sum(a and not b for a, b in zip(mine, theirs))
    losses = sum(b and not a for a, b in zip(mine, theirs))
    ties = len(mine) - wins - losses
    return {"win_rate": (wins + ties / 2) / max(len(mine), 1), "wins": wins, "losses": losses, "ties": ties}


def evaluate_tasks(args, run) -> int:
    from .data import read_prompts

    rows = [r for r in read_prompts(args.tasks) if r.get("task")]
    if not rows:
        raise DataError(f"{args.tasks}: no row names a task (a \"task\" key), so nothing can be checked")
    res = _scored(run, rows, str(args.run), args.json)
    out = {"run": str(args.run), "tasks": args.tasks, "rows": res["rows"], "accuracy": res["accuracy"], "per_task": res["per_task"]}
    if args.baseline:
        base = _scored(load_run(Path(args.baseline)), rows, str(args.baseline), args.json)
        out["baseline"] = {"run": args.baseline, "accuracy": base["accuracy"], "per_task": base["per_task"],
                           **win_rate(res["correct"], base["correct"])}
    if args.json:
        print(json.dumps(out, indent=2))
        return 0
    print(f"{args.run}: {out['accuracy']:.1%} exact answers on {out['rows']} rows of {args.tasks} ("
          + ", ".join(f"{k} {v:.0%}" for k, v in out["per_task"].items()) + ")")
    if args.baseline:
        b = out["baseline"]
        print(f"  baseline {args.baseline}: {b['accuracy']:.1%}; win-rate {b['win_rate']:.1%} "
              f"({b['wins']} wins, {b['losses']} losses, {b['ties']} ties)")
    return 0


def evaluate_tuned(args, run) -> int:
    """`worldloom eval TUNED_RUN` without --tasks: the last held-out loss and the end-of-run scores."""
    if getattr(args, "tasks", None):
        return evaluate_tasks(args, run)
    val = [r["val_loss"] for r in read_metrics(run.run_dir / METRICS) if "val_loss" in r]
    done = next((f for f in (run.run_dir / "tune_eval.json", run.run_dir / "eval.json") if f.is_file()), run.run_dir / "tune_eval.json")
    out = {"run": str(args.run), "recipe": run.cfg.recipe, "step": run.state["step"], "val_loss": val[-1] if val else None,
           **(read_json(done) if done.is_file() else {})}
    if args.json:
        print(json.dumps(out, indent=2))
    else:
        loss = f"held-out loss {out['val_loss']:.4f}" if out["val_loss"] is not None else "no held-out loss"
        print(f"{args.run} ({run.cfg.recipe}, step {out['step']}): {loss}"
              + (f", held-out accuracy {out['accuracy']:.1%}" if "accuracy" in out else "")
              + (f", held-out pair accuracy {out['pair_accuracy']:.1%}" if "pair_accuracy" in out else "")
              + " (score any task file with --tasks FILE)")
    return 0
