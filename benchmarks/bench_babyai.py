#!/usr/bin/env python
"""Issue-3 figures of the BabyAI main job against their targets, in one table.

    python benchmarks/bench_babyai.py                      # runs the main job (preset babyai, ~14 min) into a temp folder
    python benchmarks/bench_babyai.py --run runs/babyai    # reads a finished run's eval.json instead (seconds)
    python benchmarks/bench_babyai.py --quick              # a tiny run (smoke test)

Every figure comes from the run's ``eval.json`` (written by ``worldloom train`` / ``worldloom
eval``): success of the sampled policy on the held-out evaluation seeds, next-frame exact
accuracy on held-out expert and perturbed transitions (all frames, and those that reveal no
never-seen object), open-loop exact frames after 1/5/10 steps, planning beside plain acting on
the same seeds, and the main job's wall time (collect + train + evaluate) against 15 minutes.
Writes ``benchmarks/results/babyai.json``.
"""

from __future__ import annotations

import argparse
import datetime
import json
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

QUICK = ["data.episodes=40", "data.val_episodes=12", "data.workers=1", "model.n_layer=1", "model.d_model=32",
         "model.n_head=2", "model.context=256", "train.batch_size=4", "train.max_steps=6", "train.eval_interval=3",
         "train.eval_batches=1", "train.warmup_steps=2", "eval.episodes=6", "eval.envs=3", "eval.plan_episodes=2",
         "eval.open_loop=4"]


def _get(d, *keys):
    for k in keys:
        d = d.get(k) if isinstance(d, dict) else None
    return d


def figures(res: dict) -> list[dict]:
    """(name, value, target, met) rows from an eval.json dict; met is None where there is no target."""
    wm, ol = res.get("world_model", {}), _get(res, "open_loop", "horizons") or {}
    wall = sum(v for k, v in (res.get("timing") or {}).items() if k.endswith("_s") and isinstance(v, (int, float)))
    rows = [
        ("success, sampled policy, held-out seeds", _get(res, "real", "success"), 0.95),
        ("success, greedy policy, same seeds", _get(res, "real_greedy", "success"), None),
        ("success, planning in imagination", _get(res, "plan", "success"), None),
        ("success, plain policy on the planning seeds", _get(res, "plan", "policy_success_same_seeds"), None),
        ("next frame exact, held-out expert transitions", _get(wm, "expert", "frame"), 0.95),
        ("next frame exact, held-out perturbed transitions", _get(wm, "perturbed", "frame"), 0.90),
        ("share of expert next frames revealing a never-seen object", _get(wm, "expert", "novel"), None),
        ("next frame exact, expert, frames revealing nothing new", _get(wm, "expert", "frame_known"), None),
        ("next frame exact, perturbed, frames revealing nothing new", _get(wm, "perturbed", "frame_known"), None),
        ("reward accuracy, expert", _get(wm, "expert", "reward"), None),
        ("open loop exact frame after 1 step", _get(ol, "1", "frame"), None),
        ("open loop exact frame after 5 steps", _get(ol, "5", "frame"), None),
        ("open loop exact frame after 10 steps", _get(ol, "10", "frame"), 0.80),
        ("main job wall time, minutes (collect + train + evaluate)", wall / 60 if wall else None, 15.0),
    ]
    out = []
    for name, value, target in rows:
        met = None
        if target is not None and value is not None:
            met = value <= target if "minutes" in name else value >= target
        out.append({"figure": name, "value": value, "target": target, "met": met})
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--run", help="a finished world run folder: read its eval.json instead of running the main job")
    ap.add_argument("--quick", action="store_true", help="a tiny run in seconds (smoke test)")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "babyai.json"))
    args = ap.parse_args(argv)

    from worldloom.world.pipeline import machine, read_eval

    command = " ".join([Path(sys.argv[0]).name, *(argv if argv is not None else sys.argv[1:])])
    t0 = time.perf_counter()
    if args.run:
        res = read_eval(Path(args.run))
        if res is None:
            print(f"error: no eval.json in {args.run}; run `worldloom train` (or `worldloom eval {args.run}`) first", file=sys.stderr)
            return 2
    else:
        from worldloom.config import build_config
        from worldloom.world.pipeline import run_world

        with tempfile.TemporaryDirectory() as tmp:
            cfg = build_config("babyai", [f"out_dir={tmp}", "name=bench", *(QUICK if args.quick else [])])
            res = run_world(cfg, progress=False)
    rows = figures(res)
    width = max(len(r["figure"]) for r in rows)
    print(f"{'figure':<{width}}  value    target   met")
    for r in rows:
        v, t = r["value"], r["target"]
        fmt = (lambda x: "-" if x is None else f"{x:.1f}") if "minutes" in r["figure"] else (lambda x: "-" if x is None else f"{100 * x:.1f}%")
        print(f"{r['figure']:<{width}}  {fmt(v):<8} {fmt(t):<8} {'-' if r['met'] is None else ('yes' if r['met'] else 'NO')}")
    out = {"machine": res.get("machine") or machine(),
           "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
           "command": command, "run": res.get("run"), "env_id": res.get("env_id"), "steps": res.get("step"),
           "seconds": round(time.perf_counter() - t0, 1), "figures": rows}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(out, indent=2) + "\n")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
