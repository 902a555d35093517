#!/usr/bin/env python
"""Held-out NEXT-token loss of train.objective=combined against objective=next at equal wall-clock time.

The seed chapter's l_alpha = l + alpha * l_masked trains one model on next-token prediction and,
in the same steps, on fill-mask prediction with a bidirectional pass over a masked copy of the
same windows. Each step then costs about two forwards and two backwards, so in equal time the
combined run takes about half the steps. Does the masked part pay for itself on the figure a
language model is judged by? Both runs use the ``shakespeare-char`` preset (4 layers x 256,
batch 16, context 256, AdamW 2e-3, ``precision=auto``) for the same wall-clock minutes, one
after the other in fresh processes through the real CLI::

    worldloom train shakespeare-char data.path=FILE train.max_minutes=M train.objective=next name=obj_next
    worldloom train shakespeare-char data.path=FILE train.max_minutes=M train.objective=combined train.mask_alpha=1 name=obj_combined
    worldloom eval RUN --json        # next-token loss over every held-out character, once

(the combined run's tokenizer has one more token, ``<mask>``, never a target; its held-out figure
is the next-token cross-entropy of the causal pass over the same held-out characters.)

Run on a quiet machine (the budget is wall-clock; nothing else should be running)::

    python benchmarks/bench_objectives.py                      # 2 x 10 min on ../shared/data/tinyshakespeare.txt
    python benchmarks/bench_objectives.py --minutes 20 --alpha 0.5
    python benchmarks/bench_objectives.py --repeats 2          # next, combined, combined, next: order effects cancel
    python benchmarks/bench_objectives.py --quick              # tiny models, seconds each: a smoke test

Prints both held-out losses and their ratio (combined / next; below 1: the combined objective
helps), and writes ``results/objectives.json``.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))  # as the commands it runs see it (PYTHONPATH below), for its in-process evaluations
DEFAULT_DATA = ROOT.parent / "shared" / "data" / "tinyshakespeare.txt"
QUICK = ["model.n_layer=1", "model.d_model=32", "model.n_head=2", "model.context=64", "train.batch_size=4",
         "train.eval_interval=5", "train.eval_batches=2", "train.warmup_steps=2", "train.log_interval=1"]


def log(msg: str = "") -> None:
    print(msg, flush=True)


def cli(*args: str, timeout: float) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "worldloom.cli", *args], capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, "PYTHONPATH": str(ROOT / "src") + os.pathsep + os.environ.get("PYTHONPATH", "")})


def train_one(objective: str, name: str, data: Path, minutes: float, alpha: float, out_dir: Path, extra: list[str]) -> dict:
    """Train one run for `minutes` and score every held-out character with `worldloom eval`."""
    timeout = minutes * 60 * 3 + 600
    args = ["train", "shakespeare-char", f"data.path={data}", f"train.max_minutes={minutes}", f"train.objective={objective}",
            f"train.mask_alpha={alpha}", f"out_dir={out_dir}", f"name={name}", *extra, "--no-progress"]
    t = time.perf_counter()
    proc = cli(*args, timeout=timeout)
    wall = time.perf_counter() - t
    if proc.returncode != 0:
        return {"status": "error", "stderr_tail": (proc.stderr or proc.stdout)[-1500:]}
    from worldloom.cli import run_captured  # in this process: no second interpreter and torch import per run

    rc, ev = run_captured(["eval", str(out_dir / name), "--json"])
    if rc != 0:
        return {"status": "error", "stderr_tail": f"`worldloom eval {out_dir / name} --json` failed (exit {rc}; its message is above)"}
    rows = [json.loads(line) for line in (out_dir / name / "metrics.jsonl").read_text().splitlines() if line.strip()]
    steps = max((r["step"] for r in rows), default=0)
    masked = [r["loss_masked"] for r in rows if "loss_masked" in r]
    return {"status": "ok", "objective": objective, "train_wall_s": round(wall, 1), "steps": steps,
            "heldout": json.loads(ev), "last_train_loss_masked": masked[-1] if masked else None,
            "cmd": "worldloom " + " ".join(args)}


def order(repeats: int) -> list[str]:
    """next, combined, then alternating pairs reversed: next, combined, combined, next, ..."""
    pairs = [("next", "combined") if i % 2 == 0 else ("combined", "next") for i in range(repeats)]
    return [o for p in pairs for o in p]


def summarize(results: list[dict]) -> dict:
    mean = {}
    for objective in ("next", "combined"):
        losses = [r["heldout"]["loss"] for r in results if r["status"] == "ok" and r["objective"] == objective]
        mean[objective] = sum(losses) / len(losses) if losses else None
    ratio = mean["combined"] / mean["next"] if mean["next"] and mean["combined"] else None
    return {"heldout_next_token_loss": mean, "ratio_combined_over_next": ratio}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", type=Path, default=DEFAULT_DATA, help="text file (default ../shared/data/tinyshakespeare.txt)")
    ap.add_argument("--minutes", type=float, default=None, help="training wall-clock per run (default 10; --quick 0.03)")
    ap.add_argument("--alpha", type=float, default=1.0, help="train.mask_alpha of the combined run (default 1, the chapter's)")
    ap.add_argument("--repeats", type=int, default=1, help="pairs of runs, in alternating order (default 1)")
    ap.add_argument("--quick", action="store_true", help="tiny models and seconds of training: a smoke test")
    ap.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "results" / "objectives.json")
    ap.add_argument("--keep-runs", type=Path, default=None, help="keep the run folders here (default: a temporary folder)")
    args = ap.parse_args(argv)
    if not args.data.is_file():
        ap.error(f"no text file at {args.data} (pass --data FILE)")
    if args.repeats < 1:
        ap.error("--repeats must be at least 1")
    minutes = args.minutes if args.minutes is not None else (0.03 if args.quick else 10.0)
    extra = QUICK if args.quick else []
    res = {"date_utc": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"), "quick": args.quick,
           "data": str(args.data), "minutes": minutes, "alpha": args.alpha, "cpus": os.cpu_count(),
           "loadavg_at_start": [round(x, 2) for x in os.getloadavg()], "recipe": " ".join(["shakespeare-char", *extra]), "runs": []}
    log(f"held-out next-token loss, objective next vs combined (alpha {args.alpha:g}), {minutes:g} min each on {args.data.name}; "
        f"load average {res['loadavg_at_start']}")
    with tempfile.TemporaryDirectory() as tmp:
        out_dir = args.keep_runs or Path(tmp)
        for i, objective in enumerate(order(args.repeats)):
            log(f"  {objective:8s} training {minutes:g} min ...")
            try:
                r = train_one(objective, f"obj_{objective}_{i}", args.data, minutes, args.alpha, out_dir, extra)
            except subprocess.TimeoutExpired:
                r = {"status": "timeout", "objective": objective, "stderr_tail": "killed"}
            r.setdefault("objective", objective)
            res["runs"].append(r)
            if r["status"] == "ok":
                log(f"    held-out next-token loss {r['heldout']['loss']:.4f} nats/char after {r['steps']} steps")
            else:
                log(f"    failed: {r['stderr_tail'].strip().splitlines()[-1] if r['stderr_tail'].strip() else '?'}")
    res.update(summarize(res["runs"]))
    res["loadavg_at_end"] = [round(x, 2) for x in os.getloadavg()]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(res, indent=2) + "\n")
    loss = res["heldout_next_token_loss"]
    log("")
    for objective in ("next", "combined"):
        steps = [r["steps"] for r in res["runs"] if r["status"] == "ok" and r["objective"] == objective]
        shown = f"{loss[objective]:.4f}" if loss[objective] is not None else "failed"
        log(f"{objective:9s} held-out next-token loss {shown} nats/char ({'/'.join(map(str, steps)) or '-'} steps)")
    if res["ratio_combined_over_next"] is not None:
        log(f"ratio combined / next: {res['ratio_combined_over_next']:.4f}")
    log(f"wrote {args.out}")
    return 0 if all(r["status"] == "ok" for r in res["runs"]) else 1


if __name__ == "__main__":
    sys.exit(main())
