#!/usr/bin/env python
"""Issue 15's ReAct target: exact-answer accuracy on held-out multi-step arithmetic with the
calculator, against the same model without tools (target: at least 30 points above).

    python benchmarks/bench_agent.py --dir /tmp/agent            # the whole path (~20 min on 2 loaded cores)
    python benchmarks/bench_agent.py --dir /tmp/agent --direct   # + a model tuned on direct answers alone
    python benchmarks/bench_agent.py --dir /tmp/agent --quick    # a tiny version (smoke test)

The stages are the commands a user types (docs/agents.md), each in a fresh process:
`worldloom data react` (each question with tools — the trace, Observations run by the calculator
— and without — the direct answer), a byte-level BPE base (its tokenizer learnt from the training rows' text),
then `worldloom tune sft` from that base: ``react`` on both modes (train.jsonl), and with
``--direct`` also ``direct``, the same steps on the direct answers alone (train_direct.jsonl, the same
questions).
Finished stages are kept, so an interrupted benchmark continues.

Scored on the held-out questions (none trained on: the split is by the question's hash), greedy,
exact answer, by the ReAct loop (`worldloom.agent.Agent`, batched):
  - ``react + calculator``: the react model with the calculator (the tool mode);
  - ``react, no tools``: THE SAME MODEL with the tools switched off in its prompt (``[tools: none]``:
    it must answer directly) — the comparison the target names;
  - ``direct`` (``--direct``): a model tuned only on direct answers, for reference.
Writes ``DIR/agent.json`` and prints a Markdown table.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

# A byte-level BPE model (numbers 1-999 are mostly single tokens, so an expression is a few tokens
# to copy, not a dozen characters); the base is its tokenizer and initial weights (one step): all the
# learning is the SFT on the traces.
BASE = ["tokenizer.vocab_size=1024", "model.n_layer=2", "model.d_model=64", "model.n_head=2", "model.context=128",
        "model.dropout=0"]
SFT = ["train.batch_size=16", "train.lr=0.01", "train.min_lr=0.001", "train.warmup_steps=20"]
FULL = {"n": 20000, "test_n": 300, "sft": 600, "eval_interval": 100}
QUICK = {"n": 300, "test_n": 20, "sft": 10, "eval_interval": 5}
QUICK_BASE = ["tokenizer.vocab_size=300", "model.n_layer=1", "model.d_model=32", "model.n_head=2", "model.context=128",
              "model.dropout=0"]
STOP = r'tune.stop="\n\n"'  # YAML: a blank line ends a response
TARGET = 30.0  # points

WRAP = ("import json, sys, time\n"
        "from worldloom.cli import main\n"
        "t = time.time(); rc = main(sys.argv[1:])\n"
        "print('BENCH ' + json.dumps({'rc': rc, 'seconds': time.time() - t}), file=sys.stderr)\n"
        "sys.exit(rc)\n")


def worldloom(args: list[str], log) -> dict:
    """One `worldloom` command in a fresh process: its exit status and seconds."""
    log("$ worldloom " + " ".join(repr(a) if "\n" in a else a for a in args))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT / "src"), os.environ.get("PYTHONPATH", "")])}
    p = subprocess.run([sys.executable, "-c", WRAP, *args], capture_output=True, text=True, cwd=ROOT, env=env)
    bench = [json.loads(line[6:]) for line in p.stderr.splitlines() if line.startswith("BENCH ")]
    if p.returncode or not bench:
        raise SystemExit(f"stage failed ({p.returncode}): worldloom {' '.join(args)}\n{p.stdout[-2000:]}\n{p.stderr[-3000:]}")
    return bench[0]


def stages(d: Path, quick: bool, direct: bool) -> list[tuple[str, Path, list[str]]]:
    """(name, what it makes, worldloom arguments) of every stage, in order."""
    b = QUICK if quick else FULL
    runs, data = d / "runs", d / "data"
    o = [f"out_dir={runs}", "--no-progress"]
    size = QUICK_BASE if quick else BASE
    sft = [STOP, *SFT, f"train.max_steps={b['sft']}", f"train.eval_interval={b['eval_interval']}",
           "train.eval_batches=4", "tune.val_fraction=0.01", "tune.eval_rows=0"]
    out = [
        ("data", data / "meta.json", ["data", "react", "--n", str(b["n"]), "--test-n", str(b["test_n"]), "--out", str(data)]),
        ("base", runs / "base" / "checkpoint.json",
         ["train", "text-bpe", f"data.path={data / 'pretrain.txt'}", *size, "train.max_steps=1", "train.eval_interval=1",
          "train.eval_batches=1", "name=base", *o]),
        ("react", runs / "react" / "checkpoint.json",
         ["tune", "sft", str(runs / "base"), f"data.path={data / 'train.jsonl'}", *sft, "name=react", *o]),
    ]
    return out + ([
        ("direct", runs / "direct" / "checkpoint.json",
         ["tune", "sft", str(runs / "base"), f"data.path={data / 'train_direct.jsonl'}", *sft, "name=direct", *o]),
    ] if direct else [])


def score(run_dir: Path, rows: list[dict], tools: bool) -> dict:
    """Exact-answer accuracy of the ReAct loop over the rows, with the calculator or without tools."""
    from worldloom.agent import Agent, Calculator
    from worldloom.run import load_run

    agent = Agent(load_run(run_dir), [Calculator()] if tools else [], max_steps=4)
    results = []
    for i in range(0, len(rows), 100):
        results += agent.run_batch([r["question"] for r in rows[i: i + 100]])
    right = [res.answer is not None and res.answer.strip() == r["answer"] for res, r in zip(results, rows)]
    return {"accuracy": sum(right) / len(rows), "rows": len(rows),
            "stopped": dict(Counter(res.stopped_because for res in results)),
            "tool_calls": sum(len([s for s in res.steps if s.action]) for res in results) / len(rows),
            "example": {"question": rows[0]["question"], "answer": rows[0]["answer"], "trace": results[0].trace}}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--dir", required=True, help="working folder (data, runs, agent.json); reused to continue")
    ap.add_argument("--quick", action="store_true", help="tiny sizes: a smoke test of the whole path")
    ap.add_argument("--direct", action="store_true", help="also tune and score a model on the direct answers alone "
                    "(the same steps; about doubles the time)")
    a = ap.parse_args()
    d = Path(a.dir)
    d.mkdir(parents=True, exist_ok=True)
    out_path = d / "agent.json"
    res = json.loads(out_path.read_text()) if out_path.is_file() else {}
    res.setdefault("stages", {})
    t0 = time.time()
    ran = False
    for name, made, args in stages(d, a.quick, a.direct):
        if made.is_file():
            print(f"[{name}] done already")
            continue
        res["stages"][name] = worldloom(args, print)
        ran = True
        out_path.write_text(json.dumps(res, indent=2))
    if not ran and "eval" in res and ("direct" in res["eval"]) == a.direct:
        print("[eval] done already")  # nothing trained since the stored scores
        print(table(res))
        return 0
    import torch

    torch.set_num_threads(max(1, min(2, torch.get_num_threads())))
    rows = [json.loads(line) for line in (d / "data" / "test.jsonl").read_text().splitlines() if line.strip()]
    res["eval"] = {"react + calculator": score(d / "runs" / "react", rows, True),
                   "react, no tools": score(d / "runs" / "react", rows, False)}
    if (d / "runs" / "direct" / "checkpoint.json").is_file():
        res["eval"]["direct"] = score(d / "runs" / "direct", rows, False)
    acc = {k: v["accuracy"] for k, v in res["eval"].items()}
    res["gain_points"] = 100 * (acc["react + calculator"] - acc["react, no tools"])
    res["target_met"] = res["gain_points"] >= TARGET
    res["eval_seconds"] = time.time() - t0 - sum(s["seconds"] for s in res["stages"].values() if "seconds" in s)
    res["machine"] = platform.processor() or platform.machine()
    res["date"] = datetime.date.today().isoformat()
    res["quick"] = a.quick
    out_path.write_text(json.dumps(res, indent=2))
    print(table(res))
    return 0


def table(res: dict) -> str:
    rows = ["| model, mode | held-out exact answers | tool calls per question | stopped because |", "|---|---|---|---|"]
    for name, e in res["eval"].items():
        stops = ", ".join(f"{k} {v}" for k, v in sorted(e["stopped"].items()))
        rows.append(f"| {name} | {e['accuracy']:.1%} ({e['rows']}) | {e['tool_calls']:.2f} | {stops} |")
    rows.append(f"\ncalculator gain over the same model without tools: {res['gain_points']:+.1f} points "
                f"(target >= {TARGET:g}: {'met' if res['target_met'] else 'NOT met'})")
    return "\n".join(rows)


if __name__ == "__main__":
    sys.exit(main())
