#!/usr/bin/env python
"""Issue 15's in-context-learning curve: accuracy with 0, 1, 4, 8 examples in the prompt on task
families never seen in training.

    python benchmarks/bench_icl.py --dir /tmp/icl            # the whole path (<= 25 min on 2 busy cores)
    python benchmarks/bench_icl.py --dir /tmp/icl --quick    # a tiny version (smoke test, about a minute)

Three `worldloom` commands, each in a fresh process, the ones a user types (docs/icl.md):
``data icl`` (string-rule episodes; the test families are held-out compositions), ``train icl``
(the preset: a char-level 4-layer d192 transformer on train.txt, fp32, 16 minutes on one thread:
on 2 cores shared with other jobs one thread trains ~4x faster than two)
and ``eval RUN --icl FILE --shots 0,1,4,8 --json`` on test.jsonl (unseen families) and on
seen.jsonl (fresh families of training kinds, for comparison). Target (issue 15): accuracy rises
monotonically from 0 to 8 shots on the unseen families. Writes ``DIR/icl.json`` and prints a
Markdown table; the exit status is 0 whether or not the target is met (the table says).
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SHOTS = "0,1,4,8"
FULL = {"data": ["--n", "60000"], "train": ["train.max_minutes=16", "train.threads=1", "train.eval_interval=500"],
        "eval": ["--queries", "352", "--batch-size", "64"]}
QUICK = {"data": ["--n", "300", "--rows", "12", "--families", "2"],
         "train": ["model.n_layer=1", "model.d_model=32", "model.n_head=2", "train.max_steps=6", "train.eval_interval=3",
                   "train.batch_size=4", "train.precision=fp32", "train.max_minutes=0"],
         "eval": ["--queries", "24", "--batch-size", "64"]}


def worldloom(args: list[str], log) -> str:
    """Run one `worldloom` command in a fresh process; its stdout (SystemExit with its output on failure)."""
    log("$ worldloom " + " ".join(args))
    p = subprocess.run([sys.executable, "-m", "worldloom", *args], capture_output=True, text=True, cwd=ROOT)
    if p.returncode:
        raise SystemExit(f"failed ({p.returncode}): worldloom {' '.join(args)}\n{p.stdout[-2000:]}\n{p.stderr[-3000:]}")
    return p.stdout


def monotone(acc: dict[str, float]) -> bool:
    """Strictly rising in the order of the shot counts."""
    values = [acc[k] for k in sorted(acc, key=int)]
    return all(a < b for a, b in zip(values, values[1:]))


def machine() -> str:
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
        name = next((line.split(":", 1)[1].strip() for line in out.splitlines() if line.startswith("Model name")), "")
    except OSError:
        name = ""
    return name or platform.processor() or platform.machine()


def bench(d: Path, quick: bool, log=print) -> dict:
    b = QUICK if quick else FULL
    data, runs = d / "data", d / "runs"
    shutil.rmtree(runs / "icl", ignore_errors=True)
    worldloom(["data", "icl", "--out", str(data), *b["data"]], log)
    worldloom(["train", "icl", f"data.path={data / 'train.txt'}", f"out_dir={runs}", "name=icl", "--no-progress", *b["train"]], log)
    metrics = [json.loads(line) for line in (runs / "icl" / "metrics.jsonl").read_text().splitlines() if line.strip()]
    res = {"date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"), "machine": machine(),
           "quick": quick, "steps": max(m.get("step", 0) for m in metrics),
           "val_loss": next((m["val_loss"] for m in reversed(metrics) if "val_loss" in m), None)}
    for name in ("test", "seen"):
        out = worldloom(["eval", str(runs / "icl"), "--icl", str(data / f"{name}.jsonl"), "--shots", SHOTS, "--json", *b["eval"]], log)
        res[name] = json.loads(out)
    res["monotone_unseen"] = monotone(res["test"]["accuracy"])
    (d / "icl.json").write_text(json.dumps(res, indent=2))
    return res


def table(res: dict) -> str:
    shots = res["test"]["shots"]
    rows = ["| families | " + " | ".join(f"{k} shots" for k in shots) + " |", "|---|" + "---|" * len(shots)]
    for name, label in (("test", "unseen (held-out compositions)"), ("seen", "seen kinds, fresh parameters")):
        acc = res[name]["accuracy"]
        rows.append(f"| {label}, {res[name]['queries']} queries | " + " | ".join(f"{acc[str(k)]:.1%}" for k in shots) + " |")
    for kind, acc in res["test"]["per_kind"].items():
        rows.append(f"| unseen {kind} | " + " | ".join(f"{acc[str(k)]:.0%}" for k in shots) + " |")
    return "\n".join(rows)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--dir", type=Path, required=True, help="working folder (data, runs, icl.json)")
    p.add_argument("--quick", action="store_true", help="a tiny version for the smoke test")
    args = p.parse_args(argv)
    args.dir.mkdir(parents=True, exist_ok=True)
    res = bench(args.dir, args.quick)
    print(f"\n{res['date']}, {res['machine']}, {res['steps']} training steps, held-out loss {res['val_loss']}\n")
    print(table(res))
    print(f"\nmonotone rise 0 -> 8 shots on unseen families: {'yes' if res['monotone_unseen'] else 'NO'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
