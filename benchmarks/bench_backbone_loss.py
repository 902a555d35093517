#!/usr/bin/env python
"""Held-out loss after equal wall-clock training, per backbone (issue 4), on a text file.

Each backbone (sized as in ``bench_backbones.py``: d_model 256, 4 heads, n_layer chosen so the
total is closest to 10M parameters for this vocabulary; the MoE model is the dense transformer
with 8 half-width experts, top-2, same active parameters) is trained with the same recipe —
the ``shakespeare-char`` preset (batch 16, context 256, AdamW lr 2e-3 with warm-up and cosine
decay, fp32/bf16 as ``precision=auto`` decides) — for the same number of wall-clock minutes, one
after the other in fresh processes through the real CLI::

    worldloom train shakespeare-char data.path=FILE train.max_minutes=M model.backbone=... name=...
    worldloom eval RUN --json        # loss over every held-out character, once

Run (nothing else on the machine: the budget is wall-clock)::

    python benchmarks/bench_backbone_loss.py                         # 6 backbones x 5 min on tinyshakespeare (~40 min)
    python benchmarks/bench_backbone_loss.py --minutes 10 --backbones transformer,moe
    python benchmarks/bench_backbone_loss.py --quick                 # tiny models, a few seconds each: a smoke test

Writes ``results/backbone_loss.json`` and a plot of held-out loss against wall-clock seconds
(``backbone_loss.png``; the curve is the training loop's periodic held-out estimate on fixed
sampled batches, the final figure the full held-out pass). The held-out text is the last
``data.val_fraction`` (10%) of the file: never trained on.
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

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_backbones import ALL_BACKBONES, LABELS, base_config, size_models  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_DATA = ROOT.parent / "shared" / "data" / "tinyshakespeare.txt"


def log(msg: str = "") -> None:
    print(msg, flush=True)


def overrides(cfg: dict) -> list[str]:
    """`model.key=value` overrides for one benchmark model (vocabulary and context come from the run)."""
    skip = {"vocab_size", "context"}
    return [f"model.{k}={str(v).lower() if isinstance(v, bool) else v}" for k, v in cfg.items() if k not in skip]


def char_vocab(path: Path, val_fraction: float = 0.1) -> int:
    """The vocabulary the run's char tokenizer will have (learned on the training part, as `train` does)."""
    from worldloom.data.text import read_corpus, split_text
    from worldloom.tokenize.text import TextTokenizer

    return TextTokenizer.train("char", split_text(read_corpus(path), val_fraction)[0]).vocab_size


def read_curve(run: Path) -> list[dict]:
    rows = []
    for line in (run / "metrics.jsonl").read_text().splitlines():
        row = json.loads(line)
        if "val_loss" in row:
            rows.append({"step": row["step"], "elapsed": row.get("elapsed"), "val_loss": row["val_loss"]})
    return rows


def train_one(bb: str, cfg: dict, data: Path, minutes: float, out_dir: Path, extra: list[str], timeout: float) -> dict:
    name = f"loss_{bb}"
    cmd = [sys.executable, "-m", "worldloom.cli", "train", "shakespeare-char", f"data.path={data}",
           f"train.max_minutes={minutes}", f"out_dir={out_dir}", f"name={name}", *overrides(cfg), *extra, "--no-progress"]
    t = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    wall = time.perf_counter() - t
    if proc.returncode != 0:
        return {"status": "error", "stderr_tail": (proc.stderr or proc.stdout)[-1500:], "wall_s": round(wall, 1)}
    run = out_dir / name
    from worldloom.cli import run_captured  # in this process: no second interpreter and torch import per backbone

    rc, out = run_captured(["eval", str(run), "--json"])
    if rc != 0:
        return {"status": "error", "stderr_tail": f"`worldloom eval {run} --json` failed (exit {rc}; its message is above)",
                "wall_s": round(wall, 1)}
    held = json.loads(out)
    import yaml

    tc = yaml.safe_load((run / "config.yaml").read_text())
    curve = read_curve(run)
    steps = curve[-1]["step"] if curve else 0
    return {"status": "ok", "train_wall_s": round(wall, 1), "heldout": held, "curve": curve, "steps": steps,
            "tokens_trained": steps * tc["train"]["batch_size"] * tc["train"].get("grad_accum", 1) * tc["model"]["context"],
            "cmd": "worldloom " + " ".join(cmd[3:])}


def plot(res: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for bb, r in res["results"].items():
        pts = [(c["elapsed"], c["val_loss"]) for c in r.get("curve", []) if c.get("elapsed") is not None]
        if pts:
            xs, ys = zip(*pts)
            ax.plot(xs, ys, marker=".", label=f"{LABELS[bb]} (final {r['heldout']['loss']:.3f})")
    ax.set_xlabel("training wall-clock (s)")
    ax.set_ylabel("held-out loss (nats / char)")
    ax.set_title(f"{res['minutes']:g} min per backbone, ~{res['target_params'] / 1e6:g}M params - "
                 f"{res['machine']['cpu_model'][:40]}, {res['date_utc'][:10]}", fontsize=9)
    ax.grid(True, alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", type=Path, default=DEFAULT_DATA, help="text file (default ../shared/data/tinyshakespeare.txt)")
    ap.add_argument("--minutes", type=float, default=None, help="training wall-clock per backbone (default 5; --quick 0.05)")
    ap.add_argument("--backbones", default=",".join(ALL_BACKBONES), help=f"comma-separated, from {','.join(ALL_BACKBONES)}")
    ap.add_argument("--target-params", type=float, default=None, help="total parameters to size to (default 10e6)")
    ap.add_argument("--hybrid-pattern", default="mamba,mamba,attn", help="the hybrid's layer pattern, repeated")
    ap.add_argument("--quick", action="store_true", help="tiny models and seconds of training: a smoke test")
    ap.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "results" / "backbone_loss.json",
                    help="JSON results; the plot is written next to it with the suffix .png")
    ap.add_argument("--keep-runs", type=Path, default=None, help="keep the run folders here (default: a temporary folder)")
    args = ap.parse_args(argv)

    backbones = [b.strip() for b in args.backbones.split(",") if b.strip()]
    bad = [b for b in backbones if b not in ALL_BACKBONES]
    if bad or not backbones:
        ap.error(f"unknown backbone(s) {', '.join(bad)}; choose from {', '.join(ALL_BACKBONES)}")
    if not args.data.is_file():
        ap.error(f"no text file at {args.data} (pass --data FILE)")
    minutes = args.minutes if args.minutes is not None else (0.05 if args.quick else 5.0)
    pattern = [k.strip() for k in args.hybrid_pattern.split(",") if k.strip()]
    if args.quick:
        d_model, n_head, target = 32, 2, int(args.target_params or 5e4)
        extra = ["train.eval_interval=5", "train.eval_batches=2", "train.batch_size=4", "model.context=64", "data.val_fraction=0.1"]
    else:
        d_model, n_head, target = 256, 4, int(args.target_params or 10e6)
        extra = []

    from bench_foundation import machine_info

    vocab = char_vocab(args.data)
    sizing = size_models(backbones, target, d_model, n_head, vocab, pattern)
    res: dict = {"date_utc": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                 "quick": args.quick, "machine": machine_info(), "data": str(args.data), "minutes": minutes,
                 "target_params": target, "vocab_size": vocab, "recipe": "preset shakespeare-char" + (" " + " ".join(extra) if extra else ""),
                 "sizing": sizing, "results": {}}
    m = res["machine"]
    log(f"held-out loss at equal wall-clock: {minutes:g} min per backbone on {args.data.name} (vocab {vocab}); "
        f"{m['cpu_model']}, {m['cores']} cores, torch {m['torch']}, load average {m['loadavg_at_start']}")
    with tempfile.TemporaryDirectory() as tmp:
        out_dir = args.keep_runs or Path(tmp)
        for bb in backbones:
            s = sizing[bb]
            log(f"  {LABELS[bb]:16s} n_layer {s['n_layer']:3d}, {s['params']['total']:,} params "
                f"({s['params']['active']:,} active): training {minutes:g} min ...")
            try:
                r = train_one(bb, s["config"], args.data, minutes, out_dir, extra, timeout=minutes * 60 * 3 + 600)
            except subprocess.TimeoutExpired:
                r = {"status": "timeout", "stderr_tail": f"killed after {minutes * 60 * 3 + 600:.0f} s"}
            res["results"][bb] = r
            if r["status"] == "ok":
                log(f"    held-out loss {r['heldout']['loss']:.4f} nats/char after {r['steps']} steps")
            else:
                log(f"    failed: {r['stderr_tail'].strip().splitlines()[-1] if r['stderr_tail'].strip() else '?'}")
    res["machine"]["loadavg_at_end"] = [round(x, 2) for x in os.getloadavg()]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    png = args.out.with_suffix(".png")
    res["plot"] = png.name
    plot(res, png)
    args.out.write_text(json.dumps(res, indent=2) + "\n")
    log("")
    log(f"{'backbone':18s} {'params':>12s} {'active':>12s} {'steps':>7s} {'tokens':>12s} {'held-out loss':>14s}")
    for bb, r in res["results"].items():
        p = sizing[bb]["params"]
        if r["status"] != "ok":
            log(f"{LABELS[bb]:18s} {p['total']:12,d} {p['active']:12,d}  {r['status']}")
            continue
        log(f"{LABELS[bb]:18s} {p['total']:12,d} {p['active']:12,d} {r['steps']:7d} {r['tokens_trained']:12,d} "
            f"{r['heldout']['loss']:14.4f}")
    log(f"wrote {args.out} and {png}")
    return 0 if all(r["status"] == "ok" for r in res["results"].values()) else 1


if __name__ == "__main__":
    sys.exit(main())
