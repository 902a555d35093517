"""The talk recipe: one stream of BabyAI views, actions and text about them (issue 16, requirement 4).

    worldloom train babyai-talk
    worldloom generate runs/babyai-talk --view seed=3 "Q: what is in front of you? A:"
    worldloom generate runs/babyai-talk --draw "a red ball two steps ahead" --out view.png
    worldloom eval runs/babyai-talk --json

Collection, packing, the layout and the train loop are the world recipe's; the task adds talk
segments (``worldloom.talk``); the evaluation scores captions, answers and drawn views on held-out
views and held-out colour-object pairs, and the policy in the real environment (docs/talk.md).
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from . import Recipe
from .world import load

TALK_EVAL = "eval.json"


def make_task(cfg, run_dir: Path, resuming: bool):
    from ..talk.task import TalkTask

    return TalkTask(cfg, run_dir, resuming)


def evaluate_run(run, log=print, episodes: int | None = None) -> dict:
    """The talk figures on held-out views and pairs, and the policy's success on held-out seeds."""
    from ..talk.evaluate import evaluate_talk
    from ..talk.task import talk_episodes
    from ..world.data.episodes import load_dataset
    from ..world.pipeline import eval_seeds, machine
    from ..world.rollout.agent import run_episodes
    from ..world.task import dataset_dir

    cfg = run.cfg
    t0 = time.perf_counter()
    val = load_dataset(dataset_dir(cfg, run.run_dir)).episodes("val")
    result = {"run": str(run.run_dir), "env_id": cfg.env.id, "step": run.state.get("step"),
              "minutes": round(run.state.get("elapsed", 0.0) / 60, 2), "params": run.model.num_params(), "machine": machine()}
    result.update(evaluate_talk(run, talk_episodes(run.layout, val, ())))
    for name in ("views", "held_out_pairs"):
        r = result[name]
        log(f"talk, {name} ({r['n_views']} views): " + ", ".join(
            f"{k} {r[k]:.1%}" for k in ("caption_attr", "caption_exact", "qa", "draw_attr") if r.get(k) is not None))
    n = episodes if episodes is not None else cfg.eval.episodes
    seeds = eval_seeds(cfg, n)
    res = run_episodes(run.model, run.layout, cfg.env.id, seeds, envs=cfg.eval.envs, greedy=cfg.eval.greedy, progress=False)
    result["real"] = {"episodes": n, "success": sum(r.success for r in res) / max(n, 1),
                      "policy": "greedy" if cfg.eval.greedy else "sampled"}
    log(f"policy in {cfg.env.id}: success {result['real']['success']:.1%} on {n} held-out seeds")
    result["eval_s"] = round(time.perf_counter() - t0, 1)
    return result


def _finish(run_dir: Path, log) -> dict:
    from ..io import write_json
    from ..run import load_world_run

    result = evaluate_run(load_world_run(run_dir), log=log)
    write_json(Path(run_dir) / TALK_EVAL, result)
    log(f"wrote {Path(run_dir) / TALK_EVAL}")
    return result


def run(cfg, progress: bool = True, log=print) -> dict:
    from ..train import train
    from ..world.pipeline import collect_for
    from ..world.task import dataset_dir

    data = dataset_dir(cfg, cfg.run_dir)
    if not (data / "meta.json").is_file():
        if cfg.data.path:
            from ..world.data.episodes import load_dataset

            load_dataset(data)  # the user named a folder: report what is wrong with it
        collect_for(cfg, data, progress, log)
    train(cfg, progress=progress, log=log)
    return _finish(cfg.run_dir, log)


def resume(run_dir: Path, overrides: list[str], progress: bool = True, log=print) -> dict:
    from ..train import train

    train(resume=Path(run_dir), overrides=list(overrides), progress=progress, log=log)
    return _finish(Path(run_dir), log)


def evaluate(args, run) -> int:
    """`worldloom eval RUN` of a talk run: the figures of ``evaluate_run``, written to eval.json."""
    from ..io import write_json

    quiet = (lambda *a: None) if args.json else print
    result = evaluate_run(run, log=quiet, episodes=args.episodes)
    write_json(Path(run.run_dir) / TALK_EVAL, result)
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        print(f"wrote {Path(run.run_dir) / TALK_EVAL}")
    return 0


RECIPE = Recipe("talk", "a world model that talks: views, actions and text about them in one stream", make_task, run,
                resume, load, evaluate, model_fields=("vocab_size", "slots", "period", "frame_tokens", "slot_grid"), world=True,
                vision_prefix=True)
