#!/usr/bin/env python
"""Fast imagination benchmark: imagined steps per second, token by token vs fast vs parallel.

    python benchmarks/bench_imagine_fast.py runs/babyai                    # batch 1 and 64, 20 steps
    python benchmarks/bench_imagine_fast.py runs/babyai --batches 1 --steps 4 --out /tmp/x.json

For each batch B, B imagined streams start from the real first observations of seeds 0..B-1
of the run's environment and step under the same uniformly random actions (seeded), greedy, in
each mode of `BatchedWorldModelEnv`:

* ``tokens``: every observation token by token (53 one-token forwards per BabyAI step);
* ``fast``: the frame head's drafts verified by the model (worldloom.world.rollout.fast): the
  same streams as ``tokens`` (checked: ``identical``), fewer forwards where the drafts are right;
* ``fast_head``: the same with the head's own drafts after a rejection (``redraft="head"``;
  ``fast`` redrafts from the verification's choices); which is faster depends on the model;
* ``fast_paced``: ``fast`` as `BatchedWorldModelEnv` runs it by default, with a `Pace`: each frame
  drafted or token by token, whichever the clock says is faster at this batch (``fast`` and
  ``fast_head`` draft every frame);
* ``parallel``: the frame head's frame as it is (not the token-by-token result; a bound).

Measured (wall clock, `time.perf_counter`, the step loop only; one warm-up step per mode first,
the reset's prefill not timed, context rebuilds timed): imagined steps/s = B * steps / time,
forwards per imagined step, and for fast the drafts accepted and verifications per frame.
The issue's target: fast >= 5x tokens at batch 1 and 64 on the main job's model.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
MODES = ("tokens", "fast", "fast_head", "fast_paced", "parallel")  # fast_head: redraft="head"; fast_paced: with a Pace


def real_starts(env_id: str, n: int) -> tuple[list[str], dict]:
    """Missions and first observations (batched fields) of seeds 0..n-1 of the real environment."""
    from worldloom.world.envs import make_adapter

    adapter = make_adapter(env_id)
    env = adapter.make()
    missions, fields = [], []
    try:
        for seed in range(n):
            raw, _ = env.reset(seed=seed)
            missions.append(adapter.mission(raw))
            fields.append(adapter.observe(raw))
    finally:
        env.close()
    return missions, {k: np.stack([f[k] for f in fields]) for k in fields[0]}


def measure(model, layout, missions, first, actions: np.ndarray, mode: str) -> dict:
    """One mode at one batch: steps/s of the timed loop, its counts, and the fed streams."""
    from worldloom.world.rollout.imagine import BatchedWorldModelEnv

    redraft = "head" if mode == "fast_head" else "verify"
    sim = BatchedWorldModelEnv(model, layout, "fast" if mode.startswith("fast") else mode, greedy=True, redraft=redraft,
                               pace=mode == "fast_paced")
    sim.reset(missions, first)
    sim.step(actions[0])  # warm-up
    sim.stats = type(sim.stats)()  # count the timed steps only
    start = time.perf_counter()
    for a in actions[1:]:
        sim.step(a)
    elapsed = max(time.perf_counter() - start, 1e-9)
    return {"steps_per_s": round(len(first[next(iter(first))]) * (len(actions) - 1) / elapsed, 2),
            "stats": sim.stats.as_dict(), "streams": sim.runner.steps.copy(), "rebuilds": sim.runner.rebuilds}


def bench(run, batches: list[int], steps: int, seed: int = 0, log=print) -> list[dict]:
    """Rows {batch, tokens, fast, fast_head, fast_paced, parallel (steps/s), ratio, forwards_per_step, fast_stats,
    fast_head_stats, fast_paced_stats, rebuilds, identical}."""
    model, layout = run.model, run.layout
    missions, first = real_starts(run.cfg.env.id, max(batches))
    rows = []
    for b in batches:
        actions = np.random.default_rng(seed).integers(layout.n_actions, size=(steps + 1, b))
        got = {mode: measure(model, layout, missions[:b], {k: v[:b] for k, v in first.items()}, actions, mode)
               for mode in MODES}
        tok = got["tokens"]["steps_per_s"]
        row = {"batch": b, **{m: got[m]["steps_per_s"] for m in MODES},
               "ratio": {m: round(got[m]["steps_per_s"] / tok, 2) for m in MODES if m != "tokens"},
               "forwards_per_step": {m: got[m]["stats"]["forwards_per_step"] for m in MODES},
               "fast_stats": got["fast"]["stats"], "fast_head_stats": got["fast_head"]["stats"],
               "fast_paced_stats": got["fast_paced"]["stats"],
               "rebuilds": got["tokens"]["rebuilds"],
               "identical": all(np.array_equal(got["tokens"]["streams"], got[m]["streams"]) for m in ("fast", "fast_head", "fast_paced"))}
        rows.append(row)
        log(f"batch {b:>3}: " + "  ".join(f"{m} {row[m]:.1f}" + (f" ({row['ratio'][m]:.2f}x)" if m != "tokens" else "")
                                          for m in MODES)
            + " steps/s; forwards/step " + " / ".join(f"{row['forwards_per_step'][m]:.1f}" for m in MODES)
            + f"; acceptance {row['fast_stats']['acceptance']:.1%}; identical to tokens: {row['identical']}")
    return rows


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("run", help="a trained world run folder whose model has a frame head (stream.parallel_obs=true)")
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 64])
    ap.add_argument("--steps", type=int, default=20, help="timed imagined steps per mode and batch (after one warm-up step)")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "imagine_fast.json"))
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if min(args.batches) < 1 or args.steps < 1:
        print("bench_imagine_fast: error: --batches and --steps must be at least 1", file=sys.stderr)
        return 2

    from worldloom.errors import WorldloomError
    from worldloom.run import load_world_run
    from worldloom.world.pipeline import write_bench_result

    try:
        run = load_world_run(Path(args.run))
    except WorldloomError as e:
        print(f"bench_imagine_fast: error: {e}", file=sys.stderr)
        return 2
    if run.model.frame is None:
        print(f"bench_imagine_fast: error: {args.run} has no frame head (train with stream.parallel_obs=true)", file=sys.stderr)
        return 2
    run.model.eval()
    rows = bench(run, args.batches, args.steps)
    write_bench_result(args.out, sys.argv[0], argv,
                       model={"run": args.run, "params": run.model.num_params(), "threads": torch.get_num_threads()},
                       steps=args.steps, imagine=rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
