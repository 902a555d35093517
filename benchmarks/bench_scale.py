#!/usr/bin/env python
"""Scale-out benchmark: training tokens/s of 1 process against N processes (torchrun, DDP or FSDP2).

    python benchmarks/bench_scale.py                       # 1 process vs 2 ranks (ddp and fsdp), ~3 min on 2 cores
    python benchmarks/bench_scale.py --quick               # tiny model, seconds (smoke test)
    python benchmarks/bench_scale.py --ranks 4 --dist ddp  # on a machine with more cores / GPUs

Each configuration runs the real command, ``[torchrun --nproc-per-node N] -m worldloom train
shakespeare-char ... train.dist=...``, on ../shared/data/tinyshakespeare.txt for a fixed number
of steps with the same GLOBAL batch, and reads the logged tokens/s (global: every rank's
tokens) from metrics.jsonl, skipping the first logged rows (warm-up). One process uses all
cores; each of N ranks gets cores/N threads. Nothing else may run meanwhile (on 2 cores any
other process slows torch 10-30x). The ratio printed is N ranks over 1 process.

On a 2-core CPU the honest expectation is a ratio below 1: two ranks of one thread each do the
same arithmetic as one process of two threads, and DDP adds a gradient all-reduce (gloo, over
loopback TCP) every step. What the benchmark shows on such a machine is that the distributed
path works and what its overhead is; the cost model in docs/scaling.md says how it should scale
on GPUs.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from worldloom.spawn import free_port

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data" / "tinyshakespeare.txt"
MODEL = ["model.n_layer=6", "model.d_model=384", "model.n_head=6", "model.context=256"]
QUICK_MODEL = ["model.n_layer=1", "model.d_model=32", "model.n_head=2", "model.context=32"]



def run(ranks: int, dist: str, args, out: Path, data: Path) -> dict:
    """One training run; returns its median logged tokens/s and the world size it logged."""
    cores = os.cpu_count() or 1
    name = f"r{ranks}-{dist}"
    overrides = [f"data.path={data}", f"out_dir={out}", f"name={name}", *(QUICK_MODEL if args.quick else MODEL),
                 f"train.batch_size={args.batch}", f"train.max_steps={args.steps}", "train.eval_interval=100000",
                 "train.eval_batches=1", "train.log_interval=1", "train.max_minutes=0", f"train.precision={args.precision}",
                 f"train.threads={max(1, cores // ranks)}", f"train.dist={dist if ranks > 1 else 'none'}"]
    cmd = [sys.executable, "-m", "worldloom", "train", "shakespeare-char", "--no-progress", *overrides]
    if ranks > 1:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(ranks), "--master-port",
               str(free_port()), *cmd[1:]]
    env = dict(os.environ, OMP_NUM_THREADS=str(max(1, cores // ranks)))
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=3600)
    if proc.returncode:
        workers = proc.stderr.split("Traceback (most recent call last):\n  File \"<frozen runpy>\"")[0]  # not torchrun's own
        raise SystemExit(f"{name} failed (exit {proc.returncode}):\n{workers[-3000:]}\n{proc.stderr[-600:]}")
    rows = [json.loads(line) for line in (out / name / "metrics.jsonl").read_text().splitlines()]
    tps = [r["tokens_per_s"] for r in rows if "tokens_per_s" in r][args.skip:]
    return {"ranks": ranks, "dist": dist if ranks > 1 else "none", "tokens_per_s": statistics.median(tps),
            "logged_world": max((r.get("ranks", 1) for r in rows), default=1), "steps": len(tps)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--ranks", type=int, default=2)
    p.add_argument("--dist", nargs="+", default=["ddp", "fsdp"], choices=["ddp", "fsdp"])
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--skip", type=int, default=5, help="logged steps not counted (warm-up)")
    p.add_argument("--batch", type=int, default=16, help="global batch (rows of model.context tokens)")
    p.add_argument("--precision", default="fp32", choices=["fp32", "bf16"])
    p.add_argument("--data", type=Path, default=DATA)
    p.add_argument("--quick", action="store_true", help="a tiny model and few steps (smoke test)")
    p.add_argument("--out", type=Path, default=None, help="write the results as JSON here")
    args = p.parse_args()
    if args.quick:
        args.steps, args.skip, args.batch = 4, 1, 4
    with tempfile.TemporaryDirectory() as tmp:
        data = args.data
        if not data.is_file():  # a smoke test on a machine without shared/: any text will do
            data = Path(tmp) / "text.txt"
            data.write_text("To be, or not to be, that is the question.\n" * 400)
        rows = [run(1, "none", args, Path(tmp), data)]
        rows += [run(args.ranks, d, args, Path(tmp), data) for d in args.dist]
    base = rows[0]["tokens_per_s"]
    for r in rows:
        r["ratio"] = r["tokens_per_s"] / base
        print(f"{r['ranks']} process{'es' if r['ranks'] > 1 else ''} {r['dist']:5s}: {r['tokens_per_s']:10,.0f} tokens/s  "
              f"({r['ratio']:.2f}x one process; {r['steps']} steps, logged world {r['logged_world']})")
    res = {"date_utc": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"), "cores": os.cpu_count(),
           "quick": args.quick, "precision": args.precision, "global_batch": args.batch, "rows": rows}
    if args.out:
        args.out.write_text(json.dumps(res, indent=2))


if __name__ == "__main__":
    main()
