#!/usr/bin/env python
"""Training throughput of the world stream's two designs, in one run: steps of play learned per second.

    python benchmarks/bench_world_train.py                    # preset-sized models, ~2 minutes
    python benchmarks/bench_world_train.py --quick            # tiny shapes (smoke test)

What is timed (wall clock, this process only, nothing else should run): full training steps of the
`babyai` preset's model — forward under the run's autocast, the world-stream loss, backward, AdamW —
on batches the training task packs from BabyAI bot episodes collected here (a few hundred; speed
does not depend on what they hold), for

* ``tokens``: the token stream (53 positions per step of play), the preset's batch (16 rows);
* ``encoded``: ``stream.obs=encoded`` (4 positions per step; the frame decoder predicts 50 cells per
  step), batch 8 rows;
* ``encoded+film``: the same with ``stream.obs_film=true`` (the frame encoder reads the mission);
* ``encoded, torch decoder``: the encoded model with the frame decoder run through its
  ``nn.TransformerEncoder`` (PyTorch's CPU flash attention on ~50 cells x hundreds of frames)
  instead of worldloom's written-out attention — the peer of the change that wrote it out.

Each case: warm-up steps, then the best of 3 repeats of ``--steps`` steps. Steps of play per second =
(steps of play whose action is in the batch) / seconds per training step; the ratio column is
against the token stream measured in the same run.
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

import torch

ROOT = Path(__file__).resolve().parents[1]


def build(data_dir: Path, overrides: list[str], quick: bool):
    from worldloom.config import build_config
    from worldloom.model import LWM
    from worldloom.train.optim import make_optimizer
    from worldloom.world.task import WorldTask

    size = ["model.n_layer=1", "model.d_model=32", "model.n_head=2", "model.context=256"] if quick else []
    cfg = build_config("babyai", [f"data.path={data_dir}", f"out_dir={data_dir.parent}", "name=bench", *size, *overrides])
    task = WorldTask(cfg, data_dir.parent / "bench", False)
    for k, v in task.model_sizes().items():
        setattr(cfg.model, k, v)
    torch.manual_seed(0)
    model = LWM(cfg.model)
    return cfg, task, model, make_optimizer(model, cfg.train)


def time_case(cfg, task, model, opt, steps: int, warmup: int, precision: str) -> dict:
    from worldloom.model import model_inputs
    from worldloom.runtime import autocast

    dev = torch.device("cpu")
    gen = torch.Generator().manual_seed(0)
    batches = [task.batch(cfg.train.batch_size, gen) for _ in range(steps)]
    play = sum(int((b["target"] >= task.layout.offset["action"]).logical_and(
        b["target"] < task.layout.offset["action"] + task.layout.n_actions).sum()) for b in batches) / len(batches)

    def step(b):
        with autocast(precision, dev):
            out = model(**model_inputs(b))
            loss = task.objective(out, b).total
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    for b in batches[:warmup]:
        step(b)
    best = float("inf")
    for _ in range(3):
        t = time.perf_counter()
        for b in batches:
            step(b)
        best = min(best, (time.perf_counter() - t) / len(batches))
    return {"s_per_step": best, "play_steps_per_batch": play, "play_steps_per_s": play / best,
            "rows": cfg.train.batch_size, "params": sum(p.numel() for p in model.parameters())}


def torch_decoder(model) -> None:
    """Run the model's frame decoder through its nn.TransformerEncoder layers (PyTorch's attention kernels)."""
    dec = model.obs_decoder
    dec.forward = lambda h, prev: dec.layers(prev + dec.query + dec.cond(h).unsqueeze(1))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=4, help="timed training steps per repeat (default 4)")
    ap.add_argument("--episodes", type=int, default=400, help="bot episodes to collect for the batches (default 400)")
    ap.add_argument("--precision", default="bf16", choices=["bf16", "fp32"])
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0 = all cores)")
    ap.add_argument("--quick", action="store_true", help="tiny shapes: a smoke test of the benchmark itself")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "world_train.json"), help="JSON results file")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    from worldloom.world.data.collect import collect_dataset

    # the preset's token-stream-only inputs (places, match) off for the encoded design
    encoded = ["stream.obs=encoded", "stream.places=false", "stream.match=false", "train.batch_size=8"]
    cases = [("tokens", []), ("encoded", encoded), ("encoded+film", [*encoded, "stream.obs_film=true"]),
             ("encoded, torch decoder", encoded)]
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        data = Path(tmp) / "data"
        episodes = 40 if args.quick else args.episodes
        collect_dataset(data, "BabyAI-GoToLocal-v0", episodes, 4, workers=1, progress=False, log=lambda *a: None)
        for name, over in cases:
            if args.quick:
                over = [*over, "train.batch_size=2"]
            cfg, task, model, opt = build(data, over, args.quick)
            if name.endswith("torch decoder"):
                torch_decoder(model)
            results[name] = r = time_case(cfg, task, model, opt, 2 if args.quick else args.steps, 1 if args.quick else 2,
                                          args.precision)
            print(f"{name:<24} {r['params'] / 1e6:5.2f}M  {r['rows']:>3} rows  {r['s_per_step']:6.3f} s/step  "
                  f"{r['play_steps_per_batch']:7.0f} steps of play/batch  {r['play_steps_per_s']:8.1f} steps of play/s  "
                  f"{r['play_steps_per_s'] / results['tokens']['play_steps_per_s']:5.2f}x tokens", flush=True)
    dec = results["encoded"]["s_per_step"], results["encoded, torch decoder"]["s_per_step"]
    print(f"written-out decoder attention vs torch's: {dec[1] / dec[0]:.2f}x faster per training step")
    info = {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "machine": f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads, torch {torch.__version__}",
            "precision": args.precision, "quick": args.quick, "results": results}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(info, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
