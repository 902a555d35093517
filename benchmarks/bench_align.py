#!/usr/bin/env python
"""Issue 13's figures: SFT (LoRA and full), DPO, ORPO, PPO against the checker, a reward model, on
the synthetic tasks' held-out test set, each with its tuning minutes, in one table.

    python benchmarks/bench_align.py --dir /tmp/align            # the whole path (about an hour on 2 cores)
    python benchmarks/bench_align.py --dir /tmp/align --quick    # a tiny version (smoke test, a minute)
    python benchmarks/bench_align.py --dir /tmp/align --only dpo # (re)run one stage; finished stages are kept

Every stage is one `worldloom` command in a fresh process (its peak resident memory is read from
the process itself), the same commands a user types (docs/tuning.md). A stage whose run folder
already holds a finished run is skipped, so an interrupted benchmark continues. The evaluation:
`worldloom eval RUN --tasks test.jsonl --baseline SFT --json` for every tuned run (greedy
answers, exact match by the task's checker; win-rate against the SFT model). Targets (issue 13):
DPO >= SFT + 15 points, ORPO (from the base) > SFT, PPO >= SFT + 20 points, LoRA within 2 points
of full fine-tuning with the same budget. Writes ``DIR/align.json`` and prints a Markdown table.
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

# The base: a character-level transformer trained on the tasks' pretraining text.
BASE = ["model.n_layer=4", "model.d_model=128", "model.n_head=4", "model.context=128", "train.batch_size=16",
        "train.lr=0.002", "train.min_lr=0.0002", "train.warmup_steps=100", "train.eval_interval=500", "train.precision=fp32"]
FULL = {  # stage -> its budget at full size (the tuning recipes' defaults otherwise)
    "base": ["train.max_steps=2500"], "sft": [], "sft_full": [], "dpo": [], "dpo_rpo": ["dpo.sft_coef=1"], "orpo": [],
    "reward": [], "ppo": ["rl.updates=400", "rl.batch=64", "rl.lr=0.0003", "rl.max_new_tokens=12", "rl.checkpoint_every=50"],
}
QUICK = {
    "base": ["train.max_steps=30", "train.eval_interval=15"], "sft": ["train.max_steps=10", "train.eval_interval=5"],
    "sft_full": ["train.max_steps=10", "train.eval_interval=5"], "dpo": ["train.max_steps=6", "train.eval_interval=3"],
    "dpo_rpo": ["train.max_steps=6", "train.eval_interval=3", "dpo.sft_coef=1"],
    "orpo": ["train.max_steps=6", "train.eval_interval=3"], "reward": ["train.max_steps=6", "train.eval_interval=3"],
    "ppo": ["rl.updates=2", "rl.batch=8", "rl.max_new_tokens=8"],
}
QUICK_BASE = ["model.n_layer=1", "model.d_model=32", "model.n_head=2", "model.context=160", "train.batch_size=8"]
TASKS = "arith,reverse,sort,count"

WRAP = ("import json, resource, sys, time\n"
        "from worldloom.cli import main\n"
        "t = time.time(); rc = main(sys.argv[1:])\n"
        "print('BENCH ' + json.dumps({'rc': rc, 'seconds': time.time() - t, "
        "'peak_rss_mb': resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}), file=sys.stderr)\n"
        "sys.exit(rc)\n")


def worldloom(args: list[str], log) -> dict:
    """Run one `worldloom` command in a fresh process; its exit status, seconds and peak memory."""
    log("$ worldloom " + " ".join(args))
    p = subprocess.run([sys.executable, "-c", WRAP, *args], capture_output=True, text=True, cwd=ROOT)
    bench = [json.loads(line[6:]) for line in p.stderr.splitlines() if line.startswith("BENCH ")]
    if p.returncode or not bench:
        raise SystemExit(f"stage failed ({p.returncode}): worldloom {' '.join(args)}\n{p.stdout[-2000:]}\n{p.stderr[-3000:]}")
    log(p.stdout.strip().splitlines()[-1] if p.stdout.strip() else "")
    return {**bench[0], "stdout": p.stdout}


def finished(run_dir: Path) -> bool:
    return (run_dir / "checkpoint.json").is_file() and ((run_dir / "tune_eval.json").is_file() or (run_dir / "eval.json").is_file()
                                                        or run_dir.name == "base")


def stages(d: Path, quick: bool) -> list[tuple[str, list[str]]]:
    """(name, worldloom arguments) of every stage, in order."""
    b = QUICK if quick else FULL
    runs, data = d / "runs", d / "data"
    o = [f"out_dir={runs}"]
    base = [*(QUICK_BASE if quick else BASE)]
    tiny = ["tune.eval_rows=8"] if quick else []
    n = "600" if quick else "20000"
    return [
        ("data", ["data", "instruct", "--tasks", TASKS, "--n", n, "--out", str(data / "instr")]),
        ("base", ["train", "shakespeare-char", f"data.path={data / 'instr/pretrain.txt'}", *base, *b["base"], *o, "name=base",
                  "--no-progress"]),
        ("sft", ["tune", "sft", str(runs / "base"), f"data.path={data / 'instr/train.jsonl'}", "lora.rank=8", *b["sft"], *o,
                 *tiny, "name=sft", "--no-progress"]),
        ("sft_full", ["tune", "sft", str(runs / "base"), f"data.path={data / 'instr/train.jsonl'}", *b["sft_full"], *o,
                      *tiny, "name=sft_full", "--no-progress"]),
        ("prefs", ["tune", "prefs", str(runs / "sft"), f"data.path={data / 'instr/prompts.jsonl'}", "--samples", "4",
                   "--out", str(data / "prefs"), "--no-progress"]),
        ("dpo", ["tune", "dpo", str(runs / "sft"), f"data.path={data / 'prefs/train.jsonl'}", "lora.rank=8", "dpo.beta=0.1",
                 *b["dpo"], *o, *tiny, "name=dpo", "--no-progress"]),
        ("dpo_rpo", ["tune", "dpo", str(runs / "sft"), f"data.path={data / 'prefs/train.jsonl'}", "lora.rank=8", "dpo.beta=0.1",
                     *b["dpo_rpo"], *o, *tiny, "name=dpo_rpo", "--no-progress"]),
        ("orpo", ["tune", "orpo", str(runs / "base"), f"data.path={data / 'prefs/train.jsonl'}", "lora.rank=8", *b["orpo"], *o,
                  *tiny, "name=orpo", "--no-progress"]),
        ("reward", ["tune", "reward", str(runs / "sft"), f"data.path={data / 'prefs/train.jsonl'}", "lora.rank=8",
                    *b["reward"], *o, *tiny, "name=rm", "--no-progress"]),
        ("ppo", ["tune", "ppo", str(runs / "sft"), f"data.path={data / 'instr/prompts.jsonl'}", "reward=checker", "lora.rank=8",
                 f"rl.eval_path={data / 'instr/test.jsonl'}", *b["ppo"], *o, "name=ppo", "--no-progress"]),
    ]


def run_dir_of(name: str, args: list[str], d: Path) -> Path | None:
    names = [a.split("=", 1)[1] for a in args if a.startswith("name=")]
    return d / "runs" / names[0] if names else None


def evaluate(d: Path, run: str, log) -> dict:
    """`worldloom eval RUN --tasks test --baseline sft --json`, in this process (no memory to measure: one torch
    import for all the evaluations instead of one each)."""
    from worldloom.cli import run_captured

    test = d / "data" / "instr" / "test.jsonl"
    args = ["eval", str(d / "runs" / run), "--tasks", str(test), "--baseline", str(d / "runs" / "sft"), "--json"]
    log("$ worldloom " + " ".join(args))
    rc, out = run_captured(args)
    if rc:
        raise SystemExit(f"evaluation failed ({rc}): worldloom {' '.join(args)}\n{out[-2000:]}")
    return json.loads(out)


def params_of(d: Path, run: str) -> dict:
    """Parameters of a run's model and how many it trained (from its start line in the stage's output)."""
    text = (d / "runs" / run / "stage.txt").read_text() if (d / "runs" / run / "stage.txt").is_file() else ""
    return params_text(text)


def memory(d: Path, quick: bool, log) -> dict:
    """Peak resident memory of a few SFT steps, LoRA against full fine-tuning, of a model large enough
    for its weights and optimizer states to show (the task models are ~1M parameters: the Python and
    torch overhead hides them). Fresh processes; the base is one training step of the same config."""
    size = ["model.n_layer=2", "model.d_model=64", "model.n_head=2"] if quick else ["model.n_layer=12", "model.d_model=768",
                                                                                    "model.n_head=12"]
    runs, data = d / "mem", d / "data" / "instr"
    common = [f"out_dir={runs}", "--no-progress"]
    out = {}
    if not (runs / "base" / "checkpoint.json").is_file():
        worldloom(["train", "shakespeare-char", f"data.path={data / 'pretrain.txt'}", *size, "model.context=128",
                   "train.batch_size=8", "train.max_steps=1", "train.eval_batches=1", "name=base", *common], log)
    for name, extra in (("lora", ["lora.rank=8"]), ("full", [])):
        if (runs / name).exists():
            import shutil

            shutil.rmtree(runs / name)
        r = worldloom(["tune", "sft", str(runs / "base"), f"data.path={data / 'train.jsonl'}", *extra, "train.max_steps=3",
                       "train.batch_size=8", "train.eval_interval=3", "train.eval_batches=1", "tune.eval_rows=0",
                       f"name={name}", *common], log)
        out[name] = {"peak_rss_mb": r["peak_rss_mb"], "seconds": r["seconds"], **params_text(r["stdout"])}
    return out


def params_text(text: str) -> dict:
    import re

    m = re.search(r"([\d.]+)M parameters(?: \(([\d,]+) trained)?", text)
    if not m:
        return {}
    total = float(m.group(1)) * 1e6
    return {"params": total, "trained": int(m.group(2).replace(",", "")) if m.group(2) else total}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dir", required=True, help="working folder (data, runs, align.json); reused to continue")
    ap.add_argument("--quick", action="store_true", help="tiny sizes: a smoke test of the whole path")
    ap.add_argument("--only", help="comma-separated stages to (re)run: data, base, sft, sft_full, prefs, dpo, dpo_rpo, orpo, reward, ppo")
    ap.add_argument("--skip", default="", help="comma-separated stages to leave out (e.g. ppo)")
    ap.add_argument("--memory", action="store_true", help="also: peak memory of LoRA vs full SFT steps on an 85M-parameter model")
    a = ap.parse_args()
    d = Path(a.dir)
    d.mkdir(parents=True, exist_ok=True)
    log = print
    out_path = d / "align.json"
    res = json.loads(out_path.read_text()) if out_path.is_file() else {"stages": {}}
    only = set(a.only.split(",")) if a.only else None
    ran = set()  # stages run now: their runs are evaluated again; the others keep a stored evaluation
    for name, args in stages(d, a.quick):
        if name in a.skip.split(",") or (only and name not in only):
            continue
        rd = run_dir_of(name, args, d)
        done = (rd and finished(rd)) or (name == "data" and (d / "data/instr/meta.json").is_file()) or (
            name == "prefs" and (d / "data/prefs/meta.json").is_file())
        if done and not only:
            log(f"[{name}] done already")
            continue
        r = worldloom(args, log)
        ran.add(rd.name if rd else name)
        if rd:
            (rd / "stage.txt").write_text(r["stdout"])
        res["stages"][name] = {k: v for k, v in r.items() if k != "stdout"}
        out_path.write_text(json.dumps(res, indent=2))
    for run in ("base", "sft", "sft_full", "dpo", "dpo_rpo", "orpo", "ppo"):
        if not (finished(d / "runs" / run) or (run == "base" and (d / "runs/base/checkpoint.json").is_file())):
            continue
        if run in res.get("eval", {}) and run not in ran and "sft" not in ran:  # (every run is compared with sft)
            log(f"[eval {run}] done already")
            continue
        res.setdefault("eval", {})[run] = {**evaluate(d, run, log), **params_of(d, run)}
        out_path.write_text(json.dumps(res, indent=2))
    if (d / "runs/rm/tune_eval.json").is_file():
        res["reward_pair_accuracy"] = json.loads((d / "runs/rm/tune_eval.json").read_text())["pair_accuracy"]
    if (d / "data/prefs/meta.json").is_file():
        res["prefs"] = json.loads((d / "data/prefs/meta.json").read_text())
    if a.memory:
        res["memory"] = memory(d, a.quick, log)
    res["machine"] = f"{platform.processor() or platform.machine()}, {platform.node()}"
    res["date"] = datetime.date.today().isoformat()
    out_path.write_text(json.dumps(res, indent=2))
    print(table(res))
    return 0


def table(res: dict) -> str:
    ev, st = res.get("eval", {}), res.get("stages", {})
    sft = ev.get("sft", {}).get("accuracy")
    rows = ["| run | test accuracy | vs SFT (points) | win-rate vs SFT | tuning minutes | peak RSS MB | trained params | target |",
            "|---|---|---|---|---|---|---|---|"]
    targets = {"dpo": "SFT + 15", "dpo_rpo": "SFT + 15", "orpo": "> SFT", "ppo": "SFT + 20", "sft_full": "LoRA within 2 points"}
    for run, e in ev.items():
        s = st.get({"rm": "reward"}.get(run, run), {})
        diff = f"{100 * (e['accuracy'] - sft):+.1f}" if sft is not None else "-"
        trained = f"{e['trained']:,.0f}" if e.get("trained") else "-"
        rows.append(f"| {run} | {e['accuracy']:.1%} | {diff} | {e.get('baseline', {}).get('win_rate', 0):.1%} | "
                    f"{s.get('seconds', 0) / 60:.1f} | {s.get('peak_rss_mb', 0):.0f} | {trained} | "
                    f"{targets.get(run, '')} |")
    for name, m in res.get("memory", {}).items():
        rows.append(f"| memory: SFT steps, {name}, {m.get('params', 0) / 1e6:.0f}M model | | | | {m['seconds'] / 60:.1f} | "
                    f"{m['peak_rss_mb']:.0f} | {m.get('trained', 0):,.0f} | |")
    return "\n".join(rows)


if __name__ == "__main__":
    sys.exit(main())
