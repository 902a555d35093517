"""The world recipe: collect episodes in an environment, train one model that is world model
and policy, evaluate it in the real environment and in imagination, write a report.

    worldloom train                   # preset babyai
    worldloom train babyai env.id=BabyAI-PickupLoc-v0

The task is ``worldloom.world.task.WorldTask``; the pipeline ``worldloom.world.pipeline``.
"""

from __future__ import annotations

import json
from pathlib import Path

from . import Recipe


def make_task(cfg, run_dir: Path, resuming: bool):
    from ..world.task import WorldTask

    return WorldTask(cfg, run_dir, resuming)


def run(cfg, progress: bool = True, log=print) -> dict:
    from ..world.pipeline import run_world

    return run_world(cfg, progress=progress, log=log)


def resume(run_dir: Path, overrides: list[str], progress: bool = True, log=print) -> dict:
    from ..world.pipeline import resume_world

    return resume_world(Path(run_dir), overrides, progress=progress, log=log)


def load(run_dir: Path) -> tuple[int, dict]:
    from ..world.stream import StreamLayout
    from ..world.task import STREAM_DIR

    layout = StreamLayout.load(Path(run_dir) / STREAM_DIR)
    return layout.vocab_size, {"layout": layout}


def evaluate(args, run) -> int:
    """`worldloom eval RUN` of a world run: every figure of evaluate_world, eval.json and report.md."""
    from ..io import write_json
    from ..world.pipeline import evaluate_world, write_outputs

    ec = run.cfg.eval
    episodes = ec.episodes if args.episodes is None else args.episodes
    plan = ec.plan_episodes if args.plan_episodes is None else args.plan_episodes
    quiet = (lambda *a: None) if args.json else print
    result = evaluate_world(run, progress=not args.json, log=quiet, episodes=episodes, plan_episodes=plan)
    own = (episodes, plan) == (ec.episodes, ec.plan_episodes)
    if own:  # the run's own settings: its figures are these
        report = write_outputs(run, result, log=quiet)
    else:  # other settings: eval.json and report.md keep the run's own figures, these go to a file of their own
        report = Path(run.run_dir) / f"eval-{episodes}ep-{plan}plan.json"
        write_json(report, result)
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        print(f"report: {report}" if own else f"figures: {report} (eval.json and report.md keep the run's own settings)")
    return 0


RECIPE = Recipe("world", "collect episodes, train a world model + policy, evaluate, report", make_task, run, resume, load,
                evaluate, model_fields=("vocab_size", "slots", "period", "frame_tokens", "slot_grid"), world=True,
                spoken=True)
