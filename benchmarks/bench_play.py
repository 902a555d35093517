#!/usr/bin/env python
"""Play benchmark (issue 15): imagined frames per second for one player stepping through the HTTP API.

    python benchmarks/bench_play.py runs/babyai                     # every mode the run has, 30 steps each
    python benchmarks/bench_play.py runs/babyai --transport asgi --imagination-only --steps 50
    python benchmarks/bench_play.py runs/babyai --quick             # 3 steps per mode (a smoke test)

One player does what the play page does (serve/static/play.js), one request after another: open a
session (seed --seed, greedy) in a mode, then for each step POST .../step with an action (a seeded
uniformly random sequence, the same in every mode) and GET the imagined frame as PNG (and the real
one, unless --imagination-only, where the real environment is not stepped either). The server is a
real uvicorn on loopback (--transport http, in a thread of this process) or the app in process
(--transport asgi: no sockets). One warm-up step per mode is not timed.

Reported per mode (tokens / parallel / fast, those the run has): imagined frames per second (= steps
per second of the whole loop), milliseconds per frame, the share of it spent in the step request,
and the ratio to the issue's target of 10 frames/s for one player on 2 cores. Figures depend on the
machine and on what else runs on it; run it on a quiet machine.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
TARGET = 10.0  # imagined frames per second for one player (issue 15)


async def play(client, world: str, mode: str, actions: list[str], seed: int, imagination_only: bool) -> dict:
    """One session in ``mode``: steps/s of the loop (step + frames) after one untimed warm-up step."""
    async def ok(response):
        if response.status_code != 200:
            raise RuntimeError(f"{response.request.method} {response.request.url.path}: {response.status_code} "
                               f"{response.text[:300]}")
        return response

    base = f"/v1/worlds/{world}/sessions"
    session = (await ok(await client.post(base, json={"seed": seed, "mode": mode, "imagination_only": imagination_only}))).json()
    path = f"{base}/{session['id']}"
    which = ["imagined"] if imagination_only else ["imagined", "real"]

    async def frame(action: str) -> float:
        start = time.perf_counter()
        await ok(await client.post(path + "/step", json={"action": action}))
        stepped = time.perf_counter()
        for w in which:
            await ok(await client.get(path + "/frame.png", params={"which": w}))
        return stepped - start

    await frame(actions[0])  # warm-up
    start = time.perf_counter()
    in_step = sum([await frame(a) for a in actions[1:]])
    elapsed = max(time.perf_counter() - start, 1e-9)
    await client.delete(path)
    n = len(actions) - 1
    fps = n / elapsed
    return {"mode": session["mode"], "steps": n, "frames_per_s": round(fps, 2), "ms_per_frame": round(1000 / fps, 1),
            "step_share": round(in_step / elapsed, 3), "vs_target": round(fps / TARGET, 3)}


async def bench_all(app, url: str | None, world: str, modes: list[str], actions: list[str], seed: int,
                    imagination_only: bool) -> list[dict]:
    import httpx

    transport = httpx.ASGITransport(app=app) if url is None else None
    async with httpx.AsyncClient(transport=transport, base_url=url or "http://bench", timeout=600) as client:
        return [await play(client, world, m, actions, seed, imagination_only) for m in modes]


def table(rows: list[dict]) -> str:
    lines = [f"{'mode':<9} {'steps':>5} {'frames/s':>9} {'ms/frame':>9} {'in step':>8} {'vs 10/s':>8}"]
    for r in rows:
        lines.append(f"{r['mode']:<9} {r['steps']:>5} {r['frames_per_s']:>9.2f} {r['ms_per_frame']:>9.1f} "
                     f"{r['step_share']:>8.0%} {r['vs_target']:>7.2f}x")
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("run", help="a world run folder")
    ap.add_argument("--modes", nargs="+", choices=["tokens", "parallel", "fast"],
                    help="modes to measure (default: every mode the run has)")
    ap.add_argument("--steps", type=int, default=30, help="timed steps per mode (after one warm-up step)")
    ap.add_argument("--quick", action="store_true", help="3 steps per mode: checks that it runs")
    ap.add_argument("--transport", choices=["http", "asgi"], default="http")
    ap.add_argument("--imagination-only", action="store_true", help="only the imagined world: no real step, no real frame")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "play.json"))
    args = ap.parse_args(argv)
    steps = 3 if args.quick else args.steps
    if steps < 1:
        print("bench_play: error: --steps must be at least 1", file=sys.stderr)
        return 2
    if args.threads:
        torch.set_num_threads(args.threads)

    from worldloom.errors import WorldloomError
    from worldloom.serve import check_installed, in_thread
    from worldloom.serve.app import create_app
    from worldloom.world.pipeline import write_bench_result
    from worldloom.world.rollout.imagine import available_modes

    try:
        check_installed()
        app = create_app([args.run])
    except WorldloomError as e:
        print(f"bench_play: error: {e}", file=sys.stderr)
        return 2
    world, served = next(iter(app.state.served.items()))
    if not served.is_world:
        print(f"bench_play: error: {args.run} is not a world run", file=sys.stderr)
        return 2
    have = available_modes(served.run.model)
    modes = [m for m in (args.modes or ["tokens", "parallel", "fast"]) if m in have]
    if not modes:
        print(f"bench_play: error: {args.run} imagines only in {', '.join(have)}", file=sys.stderr)
        return 2
    names = served.worlds.actions
    actions = [names[i] for i in np.random.default_rng(args.seed).integers(len(names), size=steps + 1)]
    if args.transport == "asgi":
        rows = asyncio.run(bench_all(app, None, world, modes, actions, args.seed, args.imagination_only))
    else:
        with in_thread(app) as url:
            rows = asyncio.run(bench_all(app, url, world, modes, actions, args.seed, args.imagination_only))
    print(table(rows))
    print(f"target: {TARGET:g} imagined frames/s for one player; best here: "
          f"{max(r['frames_per_s'] for r in rows):.2f} ({max(r['vs_target'] for r in rows):.2f}x)")
    write_bench_result(args.out, sys.argv[0], argv,
                       model={"run": args.run, "params": served.run.model.num_params(), "threads": torch.get_num_threads()},
                       transport=args.transport, imagination_only=args.imagination_only, target_fps=TARGET, play=rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
