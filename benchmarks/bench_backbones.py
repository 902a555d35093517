#!/usr/bin/env python
"""Backbone benchmark (issue 4): transformer, Mamba, RetNet, hybrid and transformer+MoE at
about 10M parameters: training throughput, decode cost per token and peak memory against context.

All figures come from one run on one machine (printed with the results). Run::

    python benchmarks/bench_backbones.py                          # full run: long (contexts up to 16384)
    python benchmarks/bench_backbones.py --quick                  # tiny models, contexts 64,128, < 60 s (smoke test)
    python benchmarks/bench_backbones.py --backbones mamba,retnet --contexts 256,4096
    python benchmarks/bench_backbones.py --out my.json            # JSON; the plot goes next to it (my.png)

Sizing (same width for all, depth chosen per backbone): every model has d_model 256, 4 heads
(head size 64), a SwiGLU feed-forward of the config's default width after every mixer, the
vocabulary (4096, tied embedding/head) and the mixers' default settings (Mamba d_state 16 (Mamba-2: 64, head size 64),
expand 2, d_conv 4; RetNet 4 heads). For each backbone n_layer is the multiple of its layer
pattern's length (1; 3 for the hybrid ``mamba,mamba,attn``) whose total parameter count is
closest to the target (--target-params, 10M). The MoE model is the dense transformer's
shape (same n_layer and d_model) with each SwiGLU replaced by 8 experts of width d_ff/2,
top-2 routing: its *active* parameters per token equal the dense model's (plus the small
routers), its total is about 4x the feed-forward part larger. Counts are printed and stored.

What is measured, one fresh subprocess per (backbone, context), wall clock (`time.perf_counter`):

* decode: batch 1, a prompt of ``context - 33`` tokens is prefilled into a fresh cache
  (``model.new_cache`` + ``model(prompt, cache)``), then 32 greedy one-token steps
  ``model(next[:, None], cache)`` are timed one by one; ms/token is their median (the mean
  is stored too). The last step ends at position context - 1, so attention attends over
  ~context keys (its cost grows with context) while Mamba and RetNet carry a fixed-size
  state (flat cost). fp32, ``torch.inference_mode``.
* train: one full optimizer step, fp32 (no autocast): forward + loss (+ MoE auxiliary
  loss), backward, grad clipping at 1.0, AdamW step, zero_grad, same batch every step.
  Batch = max(1, round(4096 / context)) sequences, so each step sees ~4096 tokens (16384
  at context 16384). Warm-up steps are not timed; tokens/s uses the median step.
* memory: the subprocess's ``ru_maxrss`` (peak resident set, includes the ~0.3-0.4 GB of
  the Python + torch import, stored as ``baseline_rss_mb``). Decode runs first, so
  ``rss_after_decode_mb`` is the peak of import + model + decode; ``peak_rss_mb`` (after
  training) is the peak of the whole case, in practice the training step's.

A case that exceeds --timeout seconds is killed; the phases it finished are kept and the
rest recorded as ``"timeout"``.

``--quick`` shrinks everything: d_model 64, 2 heads, vocabulary 256, ~250k parameters,
contexts 64,128, 1024 tokens per training step, 1 torch thread per case (on a 2-core
machine shared with another job, two threads per tiny op stall on each other: measured
~100 ms per decode step instead of <1 ms). It checks that the script works; its figures
say little about the backbones.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

RESULT_TAG = "@@BENCH_RESULT "
ALL_BACKBONES = ("transformer", "mamba", "mamba2", "retnet", "hybrid", "moe")  # the default run
CHOICES = ALL_BACKBONES + ("linear",)  # linear attention: on request (--backbones linear), not in the published tables yet
LABELS = {"transformer": "transformer", "mamba": "mamba", "mamba2": "mamba2", "retnet": "retnet", "hybrid": "hybrid",
          "moe": "transformer+MoE", "linear": "linear attention"}
DECODE_STEPS = 32


def log(msg: str = "") -> None:
    print(msg, flush=True)


def rss_mb() -> float:
    """Peak resident set size of this process so far, in MiB (Linux reports KiB)."""
    kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return round(kb / 1024 if sys.platform != "darwin" else kb / 2**20, 1)


# ---------------------------------------------------------------- sizing (parent)


def base_config(backbone: str, n_layer: int, d_model: int, n_head: int, vocab: int, context: int, pattern: list[str]) -> dict:
    """ModelConfig fields of one benchmark model (as a dict, so it can be passed to a subprocess)."""
    from worldloom.config import ModelConfig

    cfg = {"n_layer": n_layer, "n_head": n_head, "d_model": d_model, "vocab_size": vocab, "context": context,
           "dropout": 0.0, "tie_weights": True}
    if backbone == "hybrid":
        cfg.update(backbone="hybrid", layers=",".join((pattern * n_layer)[:n_layer]))
    elif backbone == "moe":
        dense_ff = ModelConfig(d_model=d_model, n_head=n_head).ff_dim
        cfg.update(backbone="transformer", ffn="moe", moe={"experts": 8, "top_k": 2}, d_ff=-(-dense_ff // 2))
    else:
        cfg.update(backbone=backbone)
    return cfg


def count_params(cfg: dict) -> dict:
    """Total, non-embedding and active (per token) parameters, built on the meta device (no memory)."""
    import torch

    from worldloom.config import ModelConfig
    from worldloom.model import LWM

    with torch.device("meta"):
        model = LWM(ModelConfig(**cfg))
    total = model.num_params()
    inactive = 0
    for m in model.moe_layers():
        per_expert = sum(p.numel() for p in m.experts[0].parameters())
        inactive += (m.n_experts - m.top_k) * per_expert
    return {"total": total, "non_embedding": model.num_params(non_embedding=True), "active": total - inactive}


def size_models(backbones: list[str], target: int, d_model: int, n_head: int, vocab: int, pattern: list[str]) -> dict:
    """n_layer per backbone (multiples of the layer pattern's length) with the total closest to `target`."""
    out: dict = {}
    for bb in backbones:
        if bb == "moe":
            continue  # follows the dense transformer
        unit = len(pattern) if bb == "hybrid" else 1
        p1 = count_params(base_config(bb, unit, d_model, n_head, vocab, 64, pattern))["total"]
        p2 = count_params(base_config(bb, 2 * unit, d_model, n_head, vocab, 64, pattern))["total"]
        per_unit, fixed = p2 - p1, 2 * p1 - p2
        guess = max(1, round((target - fixed) / per_unit))
        best = None
        for units in {max(1, guess - 1), guess, guess + 1}:
            n = units * unit
            cnt = count_params(base_config(bb, n, d_model, n_head, vocab, 64, pattern))
            if best is None or abs(cnt["total"] - target) < abs(best[1]["total"] - target):
                best = (n, cnt)
        out[bb] = {"n_layer": best[0], "params": best[1]}
    if "moe" in backbones:
        dense_n = out["transformer"]["n_layer"] if "transformer" in out else \
            size_models(["transformer"], target, d_model, n_head, vocab, pattern)["transformer"]["n_layer"]
        out["moe"] = {"n_layer": dense_n,
                      "params": count_params(base_config("moe", dense_n, d_model, n_head, vocab, 64, pattern))}
    for bb, row in out.items():
        cfg = base_config(bb, row["n_layer"], d_model, n_head, vocab, 64, pattern)
        cfg.pop("context")
        row["config"] = cfg
    return {bb: out[bb] for bb in backbones}


# ---------------------------------------------------------------- one case (child process)


def emit(obj: dict) -> None:
    print(RESULT_TAG + json.dumps(obj), flush=True)


def run_case(spec: dict) -> None:
    """Runs in a fresh interpreter: decode, then train, printing a result line after each phase."""
    baseline = rss_mb()
    import torch

    from bench_foundation import time_train_steps  # after the baseline: it imports torch and worldloom
    from worldloom.config import ModelConfig
    from worldloom.model import LWM

    torch.set_flush_denormal(True)  # as the CLI does, before the first parallel op (see runtime.flush_denormals)
    if spec["threads"] > 0:
        torch.set_num_threads(spec["threads"])
    emit({"phase": "start", "baseline_rss_mb": rss_mb(), "rss_before_import_mb": baseline,
          "torch_threads": torch.get_num_threads()})
    cfg = ModelConfig(**spec["model"])
    ctx = cfg.context
    torch.manual_seed(0)
    model = LWM(cfg)

    # decode: prefill context-33 tokens, then 32 cached greedy steps, each timed
    if "decode" in spec["phases"]:
        model.eval()
        prompt_len = ctx - DECODE_STEPS - 1
        g = torch.Generator().manual_seed(1)
        prompt = torch.randint(cfg.vocab_size, (1, prompt_len), generator=g)
        times = []
        with torch.inference_mode():
            cache = model.new_cache(1, ctx)
            t = time.perf_counter()
            logits = model(prompt, cache).logits
            prefill_s = time.perf_counter() - t
            nxt = logits[:, -1].argmax(-1)
            for _ in range(DECODE_STEPS):
                t = time.perf_counter()
                logits = model(nxt[:, None], cache).logits
                nxt = logits[:, -1].argmax(-1)
                times.append(time.perf_counter() - t)
        assert cache.length == ctx - 1, cache.length
        del cache, logits
        emit({"phase": "decode", "prompt_len": prompt_len, "steps": DECODE_STEPS,
              "prefill_s": round(prefill_s, 4),
              "ms_per_token": round(1000 * statistics.median(times), 3),
              "ms_per_token_mean": round(1000 * statistics.mean(times), 3),
              "ms_per_token_min": round(1000 * min(times), 3),
              "rss_after_decode_mb": rss_mb()})

    # train: fp32 AdamW steps on ~train_tokens tokens
    if "train" in spec["phases"]:
        batch = max(1, round(spec["train_tokens"] / ctx))
        times = time_train_steps(model, batch, ctx, "fp32", spec["train_warmup"], spec["train_steps"])
        step_s = statistics.median(times)
        emit({"phase": "train", "batch": batch, "tokens_per_step": batch * ctx, "warmup_steps": spec["train_warmup"],
              "timed_steps": spec["train_steps"], "step_s_median": round(step_s, 4),
              "step_s_all": [round(s, 4) for s in times], "tokens_per_s": round(batch * ctx / step_s, 1),
              "peak_rss_mb": rss_mb()})
    emit({"phase": "end", "peak_rss_mb": rss_mb()})


# ---------------------------------------------------------------- parent: run the cases


def parse_results(text: str) -> list[dict]:
    return [json.loads(line[len(RESULT_TAG):]) for line in text.splitlines() if line.startswith(RESULT_TAG)]


def measure(spec: dict, timeout: float) -> dict:
    """Run one (backbone, context) case in a fresh interpreter; collect what it reported."""
    cmd = [sys.executable, str(Path(__file__).resolve()), "--_case", json.dumps(spec)]
    t = time.perf_counter()
    status, stdout, stderr = "ok", "", ""
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
        stdout, stderr = proc.stdout, proc.stderr
        if proc.returncode != 0:
            status = "error"
    except subprocess.TimeoutExpired as e:  # the child was killed; keep the phases it finished
        status = "timeout"
        stdout = e.stdout.decode(errors="replace") if isinstance(e.stdout, bytes) else (e.stdout or "")
        stderr = e.stderr.decode(errors="replace") if isinstance(e.stderr, bytes) else (e.stderr or "")
    case: dict = {"status": status, "wall_s": round(time.perf_counter() - t, 2)}
    for r in parse_results(stdout):
        phase = r.pop("phase")
        if phase == "start":
            case["baseline_rss_mb"] = r["baseline_rss_mb"]
            case["torch_threads"] = r["torch_threads"]
        elif phase == "end":
            case["peak_rss_mb"] = r["peak_rss_mb"]
        else:
            if "rss_after_decode_mb" in r:
                case["rss_after_decode_mb"] = r.pop("rss_after_decode_mb")
            if "peak_rss_mb" in r:
                case["peak_rss_mb"] = r.pop("peak_rss_mb")
            case[phase] = r
    if status == "timeout" and all(phase in case for phase in spec["phases"]):
        case["status"] = status = "ok"  # every phase reported; killed while exiting
    for phase in spec["phases"]:
        if phase not in case:
            case[phase] = status if status != "ok" else "missing"
    if status == "error":
        case["stderr_tail"] = stderr[-1500:]
    return case


# ---------------------------------------------------------------- output


def cell(case: dict, phase: str, key: str, fmt: str) -> str:
    v = case.get(phase) if phase else case
    if isinstance(v, str):
        return v
    if not isinstance(v, dict) or key not in v:
        return case.get("status", "-") if case.get("status") != "ok" else "-"
    return format(v[key], fmt)


def fmt_tables(res: dict) -> str:
    contexts = res["contexts"]
    lines = []
    lines.append(f"{'backbone':18s} {'n_layer':>7s} {'d_model':>7s} {'params':>12s} {'active':>12s} {'non-embed':>12s}  layers")
    lines.append("-" * 96)
    for bb, s in res["sizing"]["models"].items():
        p = s["params"]
        kinds = s["config"].get("layers") or s["config"]["backbone"]
        if len(kinds) > 24:
            kinds = kinds[:21] + "..."
        extra = " (ffn moe 8x top-2, d_ff %d)" % s["config"]["d_ff"] if s["config"].get("ffn") == "moe" else ""
        lines.append(f"{LABELS[bb]:18s} {s['n_layer']:7d} {s['config']['d_model']:7d} {p['total']:12,d} {p['active']:12,d} "
                     f"{p['non_embedding']:12,d}  {kinds}{extra}")
    tables = [("train tokens/s (fp32, fwd+bwd+AdamW)", "train", "tokens_per_s", ".0f"),
              ("decode ms/token (batch 1, cached, at position ~context)", "decode", "ms_per_token", ".2f"),
              ("prefill s (context-33 tokens)", "decode", "prefill_s", ".3f"),
              ("peak RSS MiB (whole case; import alone ~baseline)", None, "peak_rss_mb", ".0f")]
    for title, phase, key, fmt in tables:
        lines.append("")
        lines.append(f"{title:58s}" + "".join(f"{c:>11d}" for c in contexts))
        lines.append("-" * (58 + 11 * len(contexts)))
        for bb, row in res["results"].items():
            lines.append(f"{LABELS[bb]:58s}" + "".join(f"{cell(row[str(c)], phase, key, fmt):>11s}" for c in contexts))
    base = [c["baseline_rss_mb"] for row in res["results"].values() for c in row.values() if "baseline_rss_mb" in c]
    if base:
        span = f"{min(base):.0f}" if round(min(base)) == round(max(base)) else f"{min(base):.0f}-{max(base):.0f}"
        lines.append(f"(baseline RSS after importing torch + worldloom: {span} MiB)")
    return "\n".join(lines)


def plot(res: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    for bb, row in res["results"].items():
        for ax, phase, key in ((axes[0], "decode", "ms_per_token"), (axes[1], "train", "tokens_per_s")):
            pts = [(int(c), case[phase][key]) for c, case in row.items() if isinstance(case.get(phase), dict)]
            if pts:
                xs, ys = zip(*pts)
                ax.plot(xs, ys, marker="o", label=LABELS[bb])
    m = res["machine"]
    for ax, ylabel, title in ((axes[0], "ms / token", "cached greedy decode, batch 1"),
                              (axes[1], "tokens / s", "training step (fp32, AdamW)")):
        ax.set_xscale("log", base=2)
        ax.set_xticks(res["contexts"])
        ax.set_xticklabels([str(c) for c in res["contexts"]])
        ax.set_xlabel("context (tokens)")
        ax.set_ylabel(ylabel)
        ax.set_title(title)
        ax.grid(True, alpha=0.3)
        ax.legend()
    fig.suptitle(f"worldloom backbones, ~{res['sizing']['target_params'] / 1e6:g}M params"
                 f"{' (--quick)' if res['quick'] else ''} - {m['cpu_model']}, {m['cores']} cores, {res['date_utc'][:10]}",
                 fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# ---------------------------------------------------------------- main


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="tiny models, contexts 64,128, few steps (< 60 s): a smoke test")
    ap.add_argument("--backbones", default=",".join(ALL_BACKBONES), help=f"comma-separated, from {','.join(CHOICES)}")
    ap.add_argument("--contexts", default=None, help="comma-separated context lengths (default 256,1024,4096,16384; --quick 64,128)")
    ap.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "results" / "backbones.json",
                    help="JSON results; the plot is written next to it with the suffix .png")
    ap.add_argument("--timeout", type=float, default=600.0, help="seconds per (backbone, context) case before it is killed")
    ap.add_argument("--threads", type=int, default=None,
                    help="torch CPU threads in each case (0 = torch's default; the default is 0, or 1 with --quick)")
    ap.add_argument("--target-params", type=float, default=None, help="total parameters to size to (default 10e6; --quick 2.5e5)")
    ap.add_argument("--hybrid-pattern", default="mamba,mamba,attn", help="the hybrid's layer pattern, repeated")
    ap.add_argument("--train-tokens", type=int, default=None,
                    help="tokens per training step: batch = max(1, round(this / context)) (default 4096; --quick 1024)")
    ap.add_argument("--_case", default=None, help=argparse.SUPPRESS)  # internal: run one case (child process)
    args = ap.parse_args(argv)

    if args._case is not None:
        run_case(json.loads(args._case))
        return 0

    backbones = [b.strip() for b in args.backbones.split(",") if b.strip()]
    bad = [b for b in backbones if b not in CHOICES]
    if bad or not backbones:
        ap.error(f"unknown backbone(s) {', '.join(bad)}; choose from {', '.join(CHOICES)}")
    contexts = [int(c) for c in (args.contexts or ("64,128" if args.quick else "256,1024,4096,16384")).split(",")]
    if min(contexts) <= DECODE_STEPS + 1:
        ap.error(f"contexts must exceed {DECODE_STEPS + 1} (the decode prompt is context-{DECODE_STEPS + 1} tokens)")
    pattern = [k.strip() for k in args.hybrid_pattern.split(",") if k.strip()]
    if args.quick:  # one thread: tiny ops gain nothing from two, and it keeps a busy machine from stalling them
        d_model, n_head, vocab, target = 64, 2, 256, int(args.target_params or 2.5e5)
        train_warmup, train_steps = 1, 2
        threads = 1 if args.threads is None else args.threads
        train_tokens = args.train_tokens or 1024
    else:
        d_model, n_head, vocab, target = 256, 4, 4096, int(args.target_params or 10e6)
        train_warmup, train_steps = 1, 3
        threads = args.threads or 0
        train_tokens = args.train_tokens or 4096

    from bench_foundation import machine_info  # the parent only: a child imports nothing before its baseline

    t_start = time.perf_counter()
    res: dict = {"date_utc": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                 "quick": args.quick, "machine": machine_info(), "contexts": contexts, "backbones": backbones,
                 "timeout_s": args.timeout,
                 "settings": {"precision": "fp32", "train_tokens_per_step": train_tokens, "threads": threads, "train_warmup_steps": train_warmup,
                              "train_timed_steps": train_steps, "decode_batch": 1, "decode_prompt": "context - 33",
                              "decode_timed_steps": DECODE_STEPS, "decode_figure": "median ms of the timed one-token steps"}}
    m = res["machine"]
    log(f"worldloom backbone benchmark{' (--quick)' if args.quick else ''} - {res['date_utc']}")
    log(f"machine: {m['cpu_model']}, {m['cores']} cores, {threads or m['torch_threads']} torch threads per case, {m['platform']}, "
        f"torch {m['torch']}, load average {m['loadavg_at_start']}")

    sizing = size_models(backbones, target, d_model, n_head, vocab, pattern)
    res["sizing"] = {"target_params": target, "d_model": d_model, "n_head": n_head, "vocab_size": vocab,
                     "hybrid_pattern": ",".join(pattern),
                     "method": (f"same d_model ({d_model}), heads ({n_head}) and vocabulary ({vocab}, tied) for all; per backbone "
                                f"n_layer = the multiple of its layer-pattern length whose total parameter count is closest "
                                f"to {target:,}; MoE = the dense transformer's n_layer/d_model with 8 experts of width "
                                f"d_ff/2, top-2, so its active parameters match the dense model's"),
                     "models": sizing}
    log(f"\nsizing: {res['sizing']['method']}")
    for bb, s in sizing.items():
        p = s["params"]
        log(f"  {LABELS[bb]:16s} n_layer {s['n_layer']:3d}: {p['total']:>12,d} params, {p['active']:>12,d} active, "
            f"{p['non_embedding']:>12,d} non-embedding")

    res["results"] = {bb: {} for bb in backbones}
    for ctx in contexts:
        for bb in backbones:
            spec = {"model": {**sizing[bb]["config"], "context": ctx}, "phases": ["decode", "train"],
                    "train_tokens": train_tokens, "train_warmup": train_warmup, "train_steps": train_steps,
                    "threads": threads}
            case = measure(spec, args.timeout)
            res["results"][bb][str(ctx)] = case
            log(f"  {LABELS[bb]:16s} context {ctx:6d}: train {cell(case, 'train', 'tokens_per_s', '.0f'):>8s} tok/s, "
                f"decode {cell(case, 'decode', 'ms_per_token', '.2f'):>8s} ms/token, "
                f"peak RSS {cell(case, None, 'peak_rss_mb', '.0f'):>6s} MiB ({case['status']}, {case['wall_s']} s)")
            if case["status"] == "error":
                log("    " + case["stderr_tail"].strip().splitlines()[-1] if case["stderr_tail"].strip() else "    (no stderr)")

    res["machine"]["loadavg_at_end"] = [round(x, 2) for x in os.getloadavg()]
    res["wall_seconds"] = round(time.perf_counter() - t_start, 1)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    png = args.out.with_suffix(".png")
    res["plot"] = png.name
    plot(res, png)
    args.out.write_text(json.dumps(res, indent=2) + "\n")
    log("\n" + fmt_tables(res))
    log(f"\n{m['cpu_model']}, {m['cores']} cores, torch {m['torch']}; {res['date_utc']}; "
        f"load average {m['loadavg_at_start']} -> {m['loadavg_at_end']}; {res['wall_seconds']} s")
    log(f"wrote {args.out} and {png}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
