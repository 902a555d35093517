#!/usr/bin/env python
"""The BabyAI main job's figures against issue 12's targets, in one table.

    python benchmarks/bench_babyai.py                      # runs the main job (preset babyai, ~14 min) into a temp folder
    python benchmarks/bench_babyai.py --run runs/babyai    # reads a finished run's eval.json instead (seconds)
    python benchmarks/bench_babyai.py --quick              # a tiny run (smoke test), baseline included
    python benchmarks/bench_babyai.py --run runs/babyai --baseline   # + the BabyAI-1.1-style baseline beside it

Every figure comes from the run's ``eval.json`` (written by ``worldloom train`` / ``worldloom
eval``): success of the sampled policy on the held-out evaluation seeds, next-frame exact
accuracy on held-out expert and perturbed transitions (all frames, and those that reveal no
never-seen object), open-loop exact frames after 1/5/10 steps, planning beside plain acting on
the same seeds, and the main job's wall time (collect + train + evaluate) against 15 minutes.

With ``--baseline`` (always with ``--quick``) a BabyAI-1.1-style imitation learner
(``benchmarks/babyai11.py``) is trained by behaviour cloning on the run's own demonstrations
(its data folder) for the minutes the run trained (its last checkpoint's clock, or
``--baseline-minutes``), evaluated on the same held-out seeds, and the table adds its success
and the ratios worldloom / baseline, sampled and greedy (target: at least 1, i.e. ahead).
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
        ("success, sampled policy, held-out seeds", _get(res, "real", "success"), 0.97),
        ("success, greedy policy, same seeds", _get(res, "real_greedy", "success"), 0.95),
        ("success, planning in imagination", _get(res, "plan", "success"), None),
        ("success, plain policy on the planning seeds", _get(res, "plan", "policy_success_same_seeds"), None),
        ("next frame exact, held-out expert transitions", _get(wm, "expert", "frame"), None),
        ("next frame exact, held-out perturbed transitions", _get(wm, "perturbed", "frame"), None),
        ("share of expert next frames revealing a never-seen object", _get(wm, "expert", "novel"), None),
        ("next frame exact, expert, frames revealing nothing new", _get(wm, "expert", "frame_known"), 0.95),
        ("next frame exact, perturbed, frames revealing nothing new", _get(wm, "perturbed", "frame_known"), 0.92),
        ("reward accuracy, expert", _get(wm, "expert", "reward"), None),
        ("open loop exact frame after 1 step", _get(ol, "1", "frame"), None),
        ("open loop exact frame after 5 steps", _get(ol, "5", "frame"), None),
        ("open loop exact frame after 10 steps", _get(ol, "10", "frame"), None),
        ("open loop after 10 steps, frames exact on cells seen before", _get(ol, "10", "frame_seen"), 0.80),
        ("open loop after 10 steps, cells seen before that are right", _get(ol, "10", "cell_seen"), 0.98),
        ("open loop after 10 steps, frames exact on cells o_0 showed (all the model was shown)", _get(ol, "10", "frame_shown"), None),
        ("open loop after 10 steps, cells o_0 showed that are right", _get(ol, "10", "cell_shown"), None),
        ("main job wall time, minutes (collect + train + evaluate)", wall / 60 if wall else None, 15.0),
    ]
    out = []
    for name, value, target in rows:
        met = None
        if target is not None and value is not None:
            met = value <= target if "minutes" in name else value >= target
        out.append({"figure": name, "value": value, "target": target, "met": met})
    return out


def run_minutes(run_dir: Path) -> float:
    """The minutes a run trained: the clock of its last checkpoint (pauses for on-policy collection excluded)."""
    from worldloom.checkpoint import latest_checkpoint, read_state
    from worldloom.errors import CheckpointError

    ckpt = latest_checkpoint(run_dir)
    if ckpt is None:
        raise CheckpointError(f"run folder {run_dir} holds no checkpoint, so its training minutes are unknown; "
                              "pass --baseline-minutes")
    return float(read_state(ckpt).get("elapsed", 0.0)) / 60


def baseline_for(run_dir: Path, res: dict, minutes: float | None, quick: bool) -> dict:
    """Train and evaluate the BabyAI-1.1-style baseline on a world run's demonstrations, minutes and eval seeds."""
    import babyai11
    from worldloom.errors import DataError
    from worldloom.run import read_run_config
    from worldloom.runtime import set_threads
    from worldloom.world.data.episodes import META_FILE, load_dataset
    from worldloom.world.data.onpolicy import ONPOLICY_DIR
    from worldloom.world.pipeline import eval_seeds
    from worldloom.world.task import dataset_dir

    cfg = read_run_config(run_dir)
    seeds = eval_seeds(cfg, int(_get(res, "real", "episodes") or cfg.eval.episodes))
    if _get(res, "real", "seeds") not in (None, [seeds[0], seeds[-1]]):
        raise DataError(f"{run_dir}'s eval.json was evaluated on seeds {res['real']['seeds']}, not on {cfg.data.seed}'s "
                        f"held-out seeds {seeds[0]}..{seeds[-1]}; run `worldloom eval {run_dir}` again")
    trained = run_minutes(run_dir)
    minutes = trained if minutes is None else minutes
    if quick:  # a quick (tiny) baseline ends after its few updates, not on the clock of a run that trained for seconds
        minutes = max(minutes, 1.0)
    set_threads(cfg.train.threads)
    tiny = {"max_updates": 3, "dim": 32, "batch_episodes": 8} if quick else {}
    base = babyai11.run_baseline(dataset_dir(cfg, run_dir), cfg.env.id, seeds, minutes, envs=cfg.eval.envs,
                                 seed=cfg.train.seed, **tiny)
    base["run_minutes"] = round(trained, 2)
    if (run_dir / ONPOLICY_DIR / META_FILE).is_file():
        n = load_dataset(run_dir / ONPOLICY_DIR).meta["splits"]["train"]["episodes"]
        base["note"] = (f"the run also trained on {n} on-policy episodes of its own (DAgger); "
                        "the baseline trains on the demonstrations only")
    return base


def world_success(res: dict, what: str) -> float | None:
    """The run's success with the sampled or the greedy policy (eval.json's ``real`` is whichever
    ``eval.greedy`` chose; ``real_greedy`` the greedy one beside a sampled ``real``)."""
    real = res.get("real") or {}
    if real.get("policy", "sampled") == what:
        return real.get("success")
    return _get(res, "real_greedy", "success") if what == "greedy" else None


def baseline_rows(res: dict, base: dict) -> list[dict]:
    """The baseline's success and the ratios worldloom / baseline (None where the baseline never succeeded)."""
    rows = []
    for key, what in (("real", "sampled"), ("real_greedy", "greedy")):
        wl, bl = world_success(res, what), _get(base, key, "success")
        ratio = wl / bl if wl is not None and bl else None
        base.setdefault("ratio", {})[what] = ratio
        rows += [{"figure": f"baseline (BabyAI-1.1-style) success, {what} policy, same seeds", "value": bl,
                  "target": None, "met": None},
                 {"figure": f"ratio worldloom / baseline, {what} success", "value": ratio, "target": 1.0,
                  "met": None if ratio is None else ratio >= 1.0}]
    return rows


def _fmt(figure: str, x) -> str:
    if x is None:
        return "-"
    return f"{x:.1f}" if "minutes" in figure else f"{x:.2f}x" if "ratio" in figure else f"{100 * x:.1f}%"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--run", help="a finished world run folder: read its eval.json instead of running the main job")
    ap.add_argument("--quick", action="store_true", help="a tiny run in seconds (smoke test; includes a tiny baseline)")
    ap.add_argument("--baseline", action="store_true",
                    help="also train the BabyAI-1.1-style baseline on the run's data for the run's minutes and compare")
    ap.add_argument("--baseline-minutes", type=float, help="the baseline's training minutes (default: the run's; implies --baseline)")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "babyai.json"))
    args = ap.parse_args(argv)
    if args.baseline_minutes is not None and not args.baseline_minutes > 0:
        ap.error("--baseline-minutes must be > 0")

    from worldloom.errors import WorldloomError
    from worldloom.world.pipeline import machine, read_eval

    command = " ".join([Path(sys.argv[0]).name, *(argv if argv is not None else sys.argv[1:])])
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        if args.run:
            run_dir, res = Path(args.run), read_eval(Path(args.run))
            if res is None:
                print(f"error: no eval.json in {args.run}; run `worldloom train` (or `worldloom eval {args.run}`) first",
                      file=sys.stderr)
                return 2
        else:
            from worldloom.config import build_config
            from worldloom.world.pipeline import run_world

            cfg = build_config("babyai", [f"out_dir={tmp}", "name=bench", *(QUICK if args.quick else [])])
            run_dir, res = Path(cfg.run_dir), run_world(cfg, progress=False)
        base = None
        if args.baseline or args.quick or args.baseline_minutes is not None:
            try:
                base = baseline_for(run_dir, res, args.baseline_minutes, args.quick)
            except WorldloomError as e:
                print(f"error: {e}", file=sys.stderr)
                return 2
    rows = figures(res) + (baseline_rows(res, base) if base is not None else [])
    width = max(len(r["figure"]) for r in rows)
    print(f"{'figure':<{width}}  value    target   met")
    for r in rows:
        met = "-" if r["met"] is None else ("yes" if r["met"] else "NO")
        print(f"{r['figure']:<{width}}  {_fmt(r['figure'], r['value']):<8} {_fmt(r['figure'], r['target']):<8} {met}")
    out = {"machine": res.get("machine") or machine(),
           "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
           "command": command, "run": res.get("run"), "env_id": res.get("env_id"), "steps": res.get("step"),
           "minutes": res.get("minutes"), "seconds": round(time.perf_counter() - t0, 1), "figures": rows,
           "baseline": base}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(out, indent=2) + "\n")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
