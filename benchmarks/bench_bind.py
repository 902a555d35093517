#!/usr/bin/env python
"""Modality binding (issue 16, part 6): retrieval on held-out items after training with text as the hub.

    python benchmarks/bench_bind.py --dir /tmp/bind                      # the bind preset (5-10 minutes on 2 cores)
    python benchmarks/bench_bind.py --dir /tmp/bind --reference          # also view-actions trained directly
    python benchmarks/bench_bind.py --dir /tmp/bind --steps 800 --threads 1   # a step budget (shared machine)
    python benchmarks/bench_bind.py --dir /tmp/bind --quick              # a tiny version (smoke test)

Trains `worldloom train bind` (view-text and actions-text; the preset's budget unless --steps) into
DIR/runs/hub, and with --reference the same items and budget with only view-actions trained
(DIR/runs/direct: what the pair reaches when it is trained), then `worldloom eval RUN --json` on
each. A run folder that already holds a checkpoint is evaluated as it is. Prints one Markdown table
(R@1 / R@5 both ways for every pair, with chance) and writes the figures (benchmarks/results/bind.json
by default). Targets (issue 16): view-text R@1 >= 90% on held-out items; view-actions, never trained
together, far above chance.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
QUICK = ["bind.items=96", "bind.val_items=40", "bind.dim=16", "bind.channels=8", "model.d_model=32", "model.n_head=2",
         "model.n_layer=1", "train.batch_size=16", "train.max_steps=4", "train.eval_interval=2", "train.max_minutes=0"]
RUNS = {"hub": [], "direct": ["bind.pairs=view-actions"]}


def worldloom(argv: list[str]) -> str:
    """One `worldloom` command in this process; its stdout. Exits with its one-line error on failure."""
    from worldloom.cli import run_captured

    rc, out = run_captured(argv)
    if rc:
        raise SystemExit(f"bench_bind: `worldloom {' '.join(argv)}` failed (exit {rc})")
    return out


def train_and_eval(d: Path, name: str, extra: list[str], log=print) -> dict:
    """Train DIR/runs/NAME with the preset and ``extra`` (unless it holds a checkpoint), then its eval figures."""
    from worldloom.checkpoint import latest_checkpoint

    run = d / "runs" / name
    if latest_checkpoint(run) is None:
        log(f"training {name}: worldloom train bind " + " ".join(extra))
        worldloom(["train", "bind", "--no-progress", f"out_dir={d / 'runs'}", f"name={name}", *extra])
    else:
        log(f"{name}: {run} holds a checkpoint; evaluating it as it is")
    return json.loads(worldloom(["eval", str(run), "--json"]))


def table(results: dict) -> str:
    """One Markdown row per run, pair and direction."""
    from worldloom.bind.evaluate import TABLE_HEAD, table_rows

    head = ["| run " + TABLE_HEAD[0], "| --- " + TABLE_HEAD[1]]
    return "\n".join([*head, *(row for run, res in results.items() for row in table_rows(res, run))])


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dir", required=True, help="folder for the runs (kept: a finished run is evaluated again, not retrained)")
    ap.add_argument("--reference", action="store_true", help="also train view-actions directly (the same items and budget)")
    ap.add_argument("--steps", type=int, default=0, help="a step budget (train.max_steps, no minute budget); 0: the preset's")
    ap.add_argument("--threads", type=int, default=0, help="torch threads for training (0: all cores)")
    ap.add_argument("--quick", action="store_true", help="tiny items and model, a few steps (smoke test)")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "bind.json"))
    args = ap.parse_args(argv)
    if args.steps < 0 or args.threads < 0:
        print("bench_bind: error: --steps and --threads must be >= 0", file=sys.stderr)
        return 2
    extra = [*(QUICK if args.quick else []), f"train.threads={args.threads}"]
    if args.steps:
        extra += [f"train.max_steps={args.steps}", "train.max_minutes=0"]
    names = ["hub", "direct"] if args.reference else ["hub"]
    results = {name: train_and_eval(Path(args.dir), name, extra + RUNS[name]) for name in names}
    print(table(results))
    hub = results["hub"]["pairs"]
    vt, va = hub["view-text"]["view_to_text"]["r1"], hub["view-actions"]["view_to_actions"]
    print(f"target: view -> text R@1 >= 90% on held-out items: {vt:.1%} ({'met' if vt >= 0.9 else 'not met'}); "
          f"view -> actions (never trained together) R@1 {va['r1']:.1%} vs chance {va['chance_r1']:.1%}")
    from worldloom.world.pipeline import write_bench_result

    write_bench_result(args.out, __file__, argv, budget={"steps": args.steps or "preset", "threads": args.threads, "quick": args.quick},
                       runs=results)
    return 0


if __name__ == "__main__":
    sys.exit(main())
