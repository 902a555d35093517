#!/usr/bin/env python
"""World-model benchmark: collection speed and imagination throughput, in one run.

    python benchmarks/bench_world.py                       # preset-sized model, a couple of minutes
    python benchmarks/bench_world.py --run runs/babyai     # the trained model of a run instead
    python benchmarks/bench_world.py --quick               # tiny shapes (smoke test)

What is measured (wall clock, `time.perf_counter`, this process only):

* collection: `collect_dataset` of BabyAI-GoToLocal-v0 bot episodes with 1 and 2 worker
  processes (episodes/s, including process start-up);
* imagination: `BatchedWorldModelEnv.step` with B streams, uniformly random actions, greedy
  decoding, token by token ("tokens": 53 one-token forwards per imagined step), with the
  token stream's frame head ("parallel": reward and done token by token, the 50 observation
  tokens in one pass and fed back as one chunk) and with encoded observations ("encoded",
  stream.obs=encoded: the frame decoder predicts the 50 cells from the state and the previous
  frame, fed back as one chunk that the frame encoder reads). Imagined steps per second =
  B * steps / time; the prefill of the first observation is not timed, context rebuilds are.
  Without --run the models are the babyai preset's size with random weights: speed does not
  depend on what the weights predict.
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]


def preset_model(overrides: list[str], eps, quick: bool):
    """The babyai preset's model (random weights) with ``overrides``, and its stream layout."""
    from worldloom.config import build_config
    from worldloom.model import LWM
    from worldloom.tokenize import GridTokenizer
    from worldloom.world.stream import StreamLayout
    from worldloom.world.task import stream_model_sizes

    if quick:
        overrides = [*overrides, "model.n_layer=1", "model.d_model=32", "model.n_head=2", "model.context=256"]
    cfg = build_config("babyai", overrides)
    layout = StreamLayout.build([e.mission for e in eps], 7, cfg.stream, GridTokenizer())
    for k, v in stream_model_sizes(layout, cfg.stream).items():
        setattr(cfg.model, k, v)
    torch.manual_seed(0)
    return LWM(cfg.model).eval(), layout


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--run", help="a trained world run folder (default: the preset's shape, random weights)")
    ap.add_argument("--quick", action="store_true", help="tiny shapes, seconds (smoke test)")
    ap.add_argument("--steps", type=int, default=8, help="imagined steps per measurement")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "world.json"))
    args = ap.parse_args(argv)
    torch.set_num_threads(2)

    from worldloom.run import load_world_run
    from worldloom.world.data.collect import collect_dataset
    from worldloom.world.data.episodes import load_dataset
    from worldloom.world.rollout.imagine import imagination_throughput
    from worldloom.world.pipeline import machine

    env_id = "BabyAI-GoToLocal-v0"
    res = {"machine": machine(), "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
           "command": " ".join([Path(sys.argv[0]).name, *(argv if argv is not None else sys.argv[1:])]), "collect": {}, "imagine": []}
    n_eps = 60 if args.quick else 1000
    with tempfile.TemporaryDirectory() as tmp:
        for workers in (1, 2):
            t = time.perf_counter()
            collect_dataset(Path(tmp) / f"w{workers}", env_id, n_eps, 10, workers=workers, progress=False, log=lambda *a: None)
            dt = time.perf_counter() - t
            res["collect"][f"workers_{workers}"] = {"episodes": n_eps + 10, "seconds": round(dt, 2), "episodes_per_s": round((n_eps + 10) / dt, 1)}
            print(f"collect {n_eps + 10} episodes, {workers} worker(s): {dt:.1f} s ({(n_eps + 10) / dt:.0f} episodes/s)", flush=True)
        eps = load_dataset(Path(tmp) / "w1").episodes("train")

    first = {"image": np.stack([e.obs["image"][0] for e in eps]), "direction": np.stack([e.obs["direction"][0] for e in eps])}
    missions = [e.mission for e in eps]
    if args.run:
        run = load_world_run(Path(args.run))
        model, layout = run.model, run.layout
        res["model"] = {"run": args.run, "params": model.num_params()}
        designs = {"encoded" if model.obs_decoder is not None else "tokens": (model, layout)}
        if model.frame is not None:
            designs["parallel"] = (model, layout)
    else:
        designs, res["model"] = {}, {}
        for name, overrides in (("tokens", ["stream.parallel_obs=true"]), ("encoded", ["stream.obs=encoded", "stream.places=false", "stream.match=false"])):
            model, layout = preset_model(overrides, eps, args.quick)
            designs[name] = (model, layout)
            res["model"][name] = {"preset": f"babyai + {' '.join(overrides)}", "params": model.num_params(),
                                  "d_model": model.cfg.d_model, "n_layer": model.cfg.n_layer, "context": model.cfg.context}
        designs["parallel"] = designs["tokens"]  # the token stream's frame head
    runs = [(name, "parallel" if name != "tokens" else "tokens") for name in designs]
    batches = [1, 4] if args.quick else [1, 16, 64]
    steps = 2 if args.quick else args.steps
    print(f"{'batch':>6} " + " ".join(f"{name + ' steps/s':>18}" for name, _ in runs) + "   (each / tokens)")
    for b in batches:
        row = {"batch": b}
        for name, mode in runs:
            model, layout = designs[name]
            imagination_throughput(model, layout, first, missions, batch=b, steps=1, mode=mode)  # warm-up
            row[name] = round(imagination_throughput(model, layout, first, missions, batch=b, steps=steps, mode=mode), 2)
        if "tokens" in row:
            row["ratio"] = {name: round(row[name] / row["tokens"], 2) for name, _ in runs if name != "tokens"}
        res["imagine"].append(row)
        ratios = " ".join(f"{k} {v:.2f}x" for k, v in row.get("ratio", {}).items())
        print(f"{b:>6} " + " ".join(f"{row[name]:>18.1f}" for name, _ in runs) + f"   {ratios}", flush=True)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(res, indent=2) + "\n")
    print(f"{res['machine']}; {res['date']}; wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
