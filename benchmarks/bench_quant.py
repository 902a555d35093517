#!/usr/bin/env python
"""Issue 14's quantisation figures: batch-1 decode tokens/s, held-out loss and weights on disk of one
text run in fp32, bf16 (autocast), weight-only int8 and ternary (BitNet b1.58 QAT), each quantised run on its
exact kernel and on FBGEMM's dynamic quantised linear (quant.kernel=fbgemm), in one process.

    python benchmarks/bench_quant.py runs/big                       # makes runs/big-int8 and runs/big-ternary if absent
    python benchmarks/bench_quant.py runs/big --int8 runs/i8 --ternary runs/t --tokens 300 --repeats 7
    python benchmarks/bench_quant.py --quick --dir /tmp/bq          # trains a tiny base itself (smoke test, ~a minute)

The quantised runs are made with the commands a user types (`worldloom quantize RUN --bits 8|1.58`);
the ternary QAT gets ``--qat-steps`` steps (default: the base's own train.max_steps, the same
training budget again). Decoding: greedy, batch 1, the cached path of `worldloom generate`
(``decode.generate_ids``), the same prompt for every model; each round times every variant once,
in turn (alternating, so a change in the machine's load falls on all of them), and the figure is
the median over ``--repeats`` rounds after a warm-up round. Loss: every held-out token of the base's
text once (``evaluate.full_heldout``). Ratios are against the faster of fp32 and bf16. Targets
(issue 14): ternary >= 1.5x at loss within 10%, weights <= 1/8 of fp16; int8 >= 1.3x at loss within 1%.
Writes ``--out`` (JSON) and prints a Markdown table.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from worldloom.checkpoint import latest_checkpoint  # noqa: E402
from worldloom.decode import SamplingConfig, generate_ids  # noqa: E402
from worldloom.evaluate import full_heldout  # noqa: E402
from worldloom.io import load_tensors  # noqa: E402
from worldloom.recipes.text import prepare_text  # noqa: E402
from worldloom.run import load_run  # noqa: E402
from worldloom.runtime import autocast, set_threads  # noqa: E402

QUICK_BASE = ["model.n_layer=2", "model.d_model=32", "model.n_head=2", "model.context=32", "train.batch_size=8",
              "train.max_steps=20", "train.eval_interval=10", "train.eval_batches=2", "train.warmup_steps=5",
              "train.lr=0.005", "train.precision=fp32", "train.max_minutes=0", "train.threads=1"]
PROMPT = "The "


def worldloom(*args: str) -> None:
    """One `worldloom` command in a fresh process (as a user runs it); stops the benchmark if it fails."""
    print("$ worldloom " + " ".join(args), flush=True)
    p = subprocess.run([sys.executable, "-m", "worldloom", *args, "--no-progress"], cwd=ROOT, capture_output=True, text=True,
                       env={**os.environ, "PYTHONPATH": str(ROOT / "src")})
    if p.returncode:
        raise SystemExit(f"failed ({p.returncode}): worldloom {' '.join(args)}\n{p.stdout[-2000:]}\n{p.stderr[-2000:]}")


def quick_base(d: Path) -> Path:
    """A tiny character-level base run trained on a generated text (--quick)."""
    text = d / "corpus.txt"
    if not text.exists():
        d.mkdir(parents=True, exist_ok=True)
        text.write_text("".join(f"line {i % 37}: the quick brown fox jumps over the lazy dog {i % 11}.\n" for i in range(600)))
    base = d / "runs" / "base"
    if latest_checkpoint(base) is None:
        worldloom("train", "shakespeare-char", f"data.path={text}", f"out_dir={d / 'runs'}", "name=base", *QUICK_BASE)
    return base


def ensure_quantised(base: Path, bits: str, given: Path | None, qat_steps: int | None) -> Path:
    """The quantised run of ``base`` (made with `worldloom quantize` unless it exists)."""
    run = given or base.parent / f"{base.name}-{'int8' if bits == '8' else 'ternary'}"
    if latest_checkpoint(run) is None:
        extra = [f"train.max_steps={qat_steps}"] if bits == "1.58" and qat_steps else []
        worldloom("quantize", str(base), "--bits", bits, f"out_dir={run.parent}", f"name={run.name}", *extra)
    return run


def decode_seconds(model, prompt: list[int], n: int, precision: str) -> float:
    """Seconds of n greedy batch-1 tokens after the prompt (prefill included, as generate runs it)."""
    ctx = (lambda: autocast(precision, torch.device("cpu"))) if precision != "fp32" else None
    t = time.perf_counter()
    for _ in generate_ids(model, [prompt], SamplingConfig(max_new_tokens=n, temperature=0.0), autocast_ctx=ctx):
        pass
    return time.perf_counter() - t


def weights_bytes(run: Path) -> dict:
    """Bytes of the checkpoint's weights file, and of its quantised linears' tensors."""
    path = latest_checkpoint(run) / "model.safetensors"
    tensors = load_tensors(path)
    quant = sum(v.numel() * v.element_size() for k, v in tensors.items() if k.endswith((".weight_q", ".weight_packed", ".weight_scale")))
    return {"file": path.stat().st_size, "quantised_linears": quant}


def with_kernel(model, kernel: str):
    """The quantised model with every quantised layer on ``kernel`` (what quant.kernel=fbgemm loads)."""
    layers = [m for m in model.modules() if hasattr(m, "set_kernel")]
    assert layers, "no quantised layer"
    for m in layers:
        m.set_kernel(kernel)
    return model


def measure(variants: dict, prompt: list[int], n: int, repeats: int) -> dict:
    """Median tokens/s of every variant, the variants alternating within each round (round 0: warm-up)."""
    times = {k: [] for k in variants}
    with torch.inference_mode():
        for r in range(repeats + 1):
            for name, (model, precision) in variants.items():
                s = decode_seconds(model, prompt, n, precision)
                if r:
                    times[name].append(s)
    return {k: n / statistics.median(v) for k, v in times.items()}


def run_bench(args) -> dict:
    base = quick_base(Path(args.dir)) if args.quick else Path(args.run)
    runs = {"int8": ensure_quantised(base, "8", args.int8, None),
            "ternary": ensure_quantised(base, "1.58", args.ternary, args.qat_steps)}
    set_threads(args.threads)
    b = load_run(base)
    loaded = {k: load_run(v) for k, v in runs.items()}
    variants = {"fp32": (b.model, "fp32"), "bf16": (b.model, "bf16"), "int8": (loaded["int8"].model, "fp32"),
                "ternary": (loaded["ternary"].model, "fp32"),
                "int8 fbgemm": (with_kernel(load_run(runs["int8"]).model, "fbgemm"), "fp32"),
                "ternary fbgemm": (with_kernel(load_run(runs["ternary"]).model, "fbgemm"), "fp32")}
    prompt = b.tokenizer.encode(PROMPT).tolist()
    n = min(args.tokens, b.cfg.model.context - len(prompt))
    tps = measure(variants, prompt, n, args.repeats)
    data, _ = prepare_text(b.cfg, b.tokenizer)
    loss = {k: full_heldout(m, data, b.cfg.model.context, 16, p, torch.device("cpu"))["loss"] for k, (m, p) in variants.items()}
    linears = [m for _, m in loaded["ternary"].model.named_modules() if hasattr(m, "weight_packed")]
    fp16 = sum(2 * m.in_features * m.out_features for m in linears)
    disk = {"fp32": weights_bytes(base)["file"], **{k: weights_bytes(v) for k, v in runs.items()}, "linears_fp16": fp16}
    best = max(tps["fp32"], tps["bf16"])
    return {"base": str(base), "runs": {k: str(v) for k, v in runs.items()}, "tokens": n, "repeats": args.repeats,
            "threads": torch.get_num_threads(), "tokens_per_s": tps, "speedup": {k: v / best for k, v in tps.items()},
            "loss": loss, "loss_ratio": {k: v / loss["fp32"] for k, v in loss.items()}, "disk": disk,
            "ternary_linears_vs_fp16": disk["ternary"]["quantised_linears"] / fp16,
            "machine": platform.processor() or platform.machine(), "torch": torch.__version__}


def table(res: dict) -> str:
    rows = ["| variant | tokens/s | vs faster of fp32/bf16 | held-out loss | loss vs fp32 |", "| --- | ---: | ---: | ---: | ---: |"]
    for k in ("fp32", "bf16", "int8", "int8 fbgemm", "ternary", "ternary fbgemm"):
        rows.append(f"| {k} | {res['tokens_per_s'][k]:.1f} | {res['speedup'][k]:.2f}x | {res['loss'][k]:.4f} | "
                    f"{res['loss_ratio'][k]:.3f} |")
    d = res["disk"]
    rows.append(f"\nweights on disk: fp32 {d['fp32']:,} B, int8 {d['int8']['file']:,} B, ternary {d['ternary']['file']:,} B "
                f"(its quantised linears {d['ternary']['quantised_linears']:,} B = {res['ternary_linears_vs_fp16']:.4f} of their "
                f"fp16 size {d['linears_fp16']:,} B; the rest is the full-precision embedding/head and norms)")
    return "\n".join(rows)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("run", nargs="?", help="the full-precision text run (not with --quick)")
    p.add_argument("--int8", type=Path, help="its int8 run (default RUN-int8 beside it, made if absent)")
    p.add_argument("--ternary", type=Path, help="its ternary run (default RUN-ternary beside it, made if absent)")
    p.add_argument("--qat-steps", type=int, help="ternary QAT steps when it is made (default: the base's train.max_steps)")
    p.add_argument("--tokens", type=int, default=200, help="new tokens per timed generation (capped by the context)")
    p.add_argument("--repeats", type=int, default=5, help="timed rounds (the median is reported)")
    p.add_argument("--threads", type=int, default=0, help="torch threads (0 = all cores)")
    p.add_argument("--quick", action="store_true", help="train a tiny base in --dir and run everything small")
    p.add_argument("--dir", default="/tmp/bench_quant", help="--quick: where its base and runs go")
    p.add_argument("--out", default="quant.json", help="JSON results")
    args = p.parse_args(argv)
    if bool(args.run) == args.quick:
        p.error("give a run folder, or --quick")
    if args.quick:
        args.tokens, args.repeats, args.qat_steps = min(args.tokens, 16), min(args.repeats, 2), args.qat_steps or 6
    res = run_bench(args)
    Path(args.out).write_text(json.dumps(res, indent=2))
    print(table(res))
    return 0


if __name__ == "__main__":
    sys.exit(main())
