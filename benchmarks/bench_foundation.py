#!/usr/bin/env python
"""Foundation benchmark: matmul peak, training throughput and MFU, decode speed, and
worldloom decode against Hugging Face `generate` on the exported copy of the same model.

All figures come from one run on one machine (printed with the results). Run::

    python benchmarks/bench_foundation.py                 # full run, a few minutes on 2 cores
    python benchmarks/bench_foundation.py --quick         # tiny shapes, < 30 s (smoke test)
    python benchmarks/bench_foundation.py --out my.json   # where to write the JSON
    python benchmarks/bench_foundation.py --train-only    # matmul peaks + training (worldloom vs Llama)

What is measured (wall clock, `time.perf_counter`):

* matmul: GFLOP/s = 2*M*K*N / best time, for a square and several model-shaped products
  (the training batch of 16 x 256 tokens times the model's weight matrices); the peak of a
  dtype is the best over the shapes.
* train: one full optimizer step of the training loop (autocast forward + loss, backward,
  grad clipping at 1.0, AdamW step, zero_grad), same batch every step; warm-up steps are
  not timed, the figure is the median step. FLOPs per token follow PaLM (appendix B):
  6*N + 12*n_layer*d_model*context, with N = the parameters that multiply activations:
  every non-embedding parameter plus the output head (counted even when tied to the
  embedding, since its matmul is done either way). MFU = achieved FLOP/s / measured peak.
  The same step of transformers' `LlamaForCausalLM` (sdpa attention) with the same
  configuration (`worldloom.export.hf.llama_architecture`), the same weights, its own
  fp32 cross-entropy on the same targets, the same autocast, AdamW groups
  (`make_optimizer`), clipping and batch, is timed in alternating rounds with
  worldloom's (round r: worldloom k steps, then Llama k steps), so load changes fall on
  both alike; `ratio_vs_llama` = worldloom tokens/s / Llama tokens/s (issue 11's target:
  >= 1.2). Both first losses are recorded: same weights, so they agree (fp32: ~1e-6).
* decode: `worldloom.decode.generate_ids`, greedy, prompts of equal length (no padding);
  the time covers prefill + all new tokens; tokens/s = batch * new tokens / time.
* hf: the model is saved as a run folder, loaded with `load_run`, exported with
  `worldloom.export.hf.export_hf`, loaded with `transformers.LlamaForCausalLM`, and
  timed with `generate(do_sample=False, use_cache=True, min_new_tokens=max_new_tokens)`;
  the worldloom figure it is compared with uses the very same weights (`run.model`).
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

from worldloom.config import ModelConfig, RunConfig, TrainConfig, save_yaml, to_dict
from worldloom.decode import SamplingConfig, generate_ids
from worldloom.losses import language_model_loss
from worldloom.model import LWM
from worldloom.runtime import autocast
from worldloom.train.optim import make_optimizer

CPU = torch.device("cpu")
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
# the 65 characters of tinyshakespeare: a char tokenizer on them has 65 + 256 byte tokens
CHARS = "\n !$&',-.3:;?ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz"


def log(msg: str = "") -> None:
    print(msg, flush=True)


def save_json(path: Path, res: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(res, indent=2) + "\n")
    log(f"wrote {path}")


# ---------------------------------------------------------------- machine


def machine_info() -> dict:
    model_name, flags = "unknown", set()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, val = line.partition(":")
            if key.strip() == "model name" and model_name == "unknown":
                model_name = val.strip()
            elif key.strip() == "flags" and not flags:
                flags = set(val.split())
    except OSError:
        pass
    try:
        import transformers

        tf_version = transformers.__version__
    except ImportError:
        tf_version = None
    return {
        "platform": platform.platform(),
        "python": platform.python_version(),
        "cpu_model": model_name,
        "cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "cpu_bf16_features": sorted(f for f in flags if f in ("avx512_bf16", "amx_bf16", "amx_tile", "avx512f", "avx2")),
        "torch": torch.__version__,
        "transformers": tf_version,
        "loadavg_at_start": [round(x, 2) for x in os.getloadavg()],
    }


# ---------------------------------------------------------------- 1. matmul peak


def bench_matmul(shapes: list[tuple[int, int, int]], reps: int) -> dict:
    out: dict = {"per_shape": []}
    for name, dtype in DTYPES.items():
        best = 0.0
        for m, k, n in shapes:
            g = torch.Generator().manual_seed(0)
            a = torch.randn(m, k, generator=g).to(dtype)
            b = torch.randn(k, n, generator=g).to(dtype)
            c = torch.empty(m, n, dtype=dtype)
            torch.matmul(a, b, out=c)  # warm-up (oneDNN primitive creation, page faults)
            times = []
            for _ in range(reps):
                t = time.perf_counter()
                torch.matmul(a, b, out=c)
                times.append(time.perf_counter() - t)
            gflops = 2 * m * k * n / min(times) / 1e9
            best = max(best, gflops)
            out["per_shape"].append({"dtype": name, "m": m, "k": k, "n": n, "gflops": round(gflops, 1)})
            log(f"  matmul {name:4s} {m}x{k}x{n}: {gflops:8.1f} GFLOP/s")
        out[f"{name}_peak_gflops"] = round(best, 1)
    return out


# ---------------------------------------------------------------- 2. training


def train_shapes(quick: bool) -> tuple[ModelConfig, int]:
    """The model and batch size the training figures are measured at (also profile_train.py's)."""
    if quick:
        return ModelConfig(n_layer=2, n_head=2, d_model=64, context=64, vocab_size=65, dropout=0.0), 4
    return ModelConfig(n_layer=6, n_head=6, d_model=384, context=256, vocab_size=65, dropout=0.0), 16


def _flop_params(total: int, embed: torch.Tensor, head: torch.Tensor) -> int:
    """N of the PaLM formula from a parameter count: all but the embedding, plus the output head
    (counted even when tied to the embedding, since its matmul is done either way)."""
    return total - embed.numel() + (head.numel() if head is embed else 0)


def flop_params(model: LWM) -> int:
    """N of the PaLM formula: non-embedding parameters plus the output head."""
    return _flop_params(model.num_params(), model.embed.weight, model.head.weight)


def flops_per_token(model: LWM) -> int:
    c = model.cfg
    return 6 * flop_params(model) + 12 * c.n_layer * c.d_model * c.context


@dataclass
class Trainee:
    """A model under training: its forward on a batch and its loss on that forward's output."""

    name: str
    model: torch.nn.Module
    forward: Callable[[dict], object]
    loss: Callable[[object, dict], torch.Tensor]


def worldloom_trainee(model: LWM) -> Trainee:
    return Trainee("worldloom", model, lambda d: model(d["input"]), lambda out, d: language_model_loss(out, d).total)


def llama_trainee(mcfg: ModelConfig, weights_from: LWM) -> Trainee:
    """transformers' LlamaForCausalLM (sdpa attention) of the same configuration, holding the same
    weights as `weights_from`; its loss is its own (`loss_function`: fp32 cross-entropy) on the
    same targets (shift_labels, so the same positions as worldloom's)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from worldloom.export.hf import hf_state_dict, llama_architecture

    model = LlamaForCausalLM(LlamaConfig(**llama_architecture(mcfg), attn_implementation="sdpa")).float().train()
    missing = model.load_state_dict(hf_state_dict(weights_from), strict=False)
    assert not missing.unexpected_keys and set(missing.missing_keys) <= {"lm_head.weight"}, missing
    assert (model.lm_head.weight is model.model.embed_tokens.weight) == mcfg.tie_weights

    def loss(out, d):
        return model.loss_function(logits=out.logits, labels=d["target"], vocab_size=mcfg.vocab_size, shift_labels=d["target"])

    return Trainee("llama", model, lambda d: model(input_ids=d["input"], use_cache=False), loss)


def llama_flop_params(model) -> int:
    return _flop_params(sum(p.numel() for p in model.parameters()), model.model.embed_tokens.weight, model.lm_head.weight)


def lm_batch(vocab: int, batch: int, context: int) -> dict:
    """Fixed random tokens: input (B, T) and next-token target (B, T)."""
    x = torch.randint(vocab, (batch, context + 1), generator=torch.Generator().manual_seed(0))
    return {"input": x[:, :-1].contiguous(), "target": x[:, 1:].contiguous()}


def _no_mark(name: str):
    return contextlib.nullcontext()


def train_step(t: Trainee, opt, data: dict, precision: str, grad_clip: float, mark=_no_mark) -> float:
    """One full optimizer step as the training loop takes it (autocast forward + loss, backward,
    clip, AdamW, zero_grad); returns the loss. `mark(name)` wraps each phase (profiler ranges)."""
    with autocast(precision, CPU):
        with mark("forward"):
            out = t.forward(data)
        with mark("loss"):
            loss = t.loss(out, data)
    with mark("backward"):
        loss.backward()
    value = loss.item()
    with mark("clip"):
        if grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(t.model.parameters(), grad_clip)
    with mark("optimizer"):
        opt.step()
    with mark("zero_grad"):
        opt.zero_grad(set_to_none=True)
    return value


def _timed(t: Trainee, opt, data: dict, precision: str, grad_clip: float) -> float:
    start = time.perf_counter()
    train_step(t, opt, data, precision, grad_clip)
    return time.perf_counter() - start


def time_train_steps(model: LWM, batch: int, context: int, precision: str, warmup: int, steps: int) -> list[float]:
    """Seconds of each timed full training step (forward, backward, clip, AdamW) on fixed random tokens."""
    data = lm_batch(model.cfg.vocab_size, batch, context)
    return alternate_rounds([worldloom_trainee(model)], data, batch, precision, warmup, 1, steps)[0]["times"]


def alternate_rounds(trainees: list[Trainee], data: dict, batch: int, precision: str, warmup: int, rounds: int,
                     per_round: int) -> list[dict]:
    """Each trainee (own AdamW from make_optimizer, same tokens) takes `warmup` untimed steps, then
    `rounds` rounds in which each in turn takes `per_round` timed steps, so that a change in the
    machine's load falls on all of them alike. Per trainee: {"times": [s, ...], "first_loss": loss
    of its very first step (None without warm-up)}."""
    tc = TrainConfig(batch_size=batch)
    opts = [make_optimizer(t.model, tc) for t in trainees]
    out = []
    for t, opt in zip(trainees, opts):
        t.model.train()
        first = train_step(t, opt, data, precision, tc.grad_clip) if warmup > 0 else None
        for _ in range(warmup - 1):
            train_step(t, opt, data, precision, tc.grad_clip)
        out.append({"times": [], "first_loss": first})
    for _ in range(rounds):
        for t, opt, rec in zip(trainees, opts, out):
            rec["times"] += [_timed(t, opt, data, precision, tc.grad_clip) for _ in range(per_round)]
    return out


def train_figures(times: list[float], tokens: int, fpt: int, peaks: dict, precision: str) -> dict:
    """Median step, tokens/s, achieved GFLOP/s and MFU against each dtype's measured matmul peak
    (``mfu``: against the peak of the dtype the step runs in)."""
    step_s = statistics.median(times)
    gflops = tokens / step_s * fpt / 1e9
    return {"step_s_median": round(step_s, 4), "step_s_all": [round(s, 4) for s in times],
            "tokens_per_s": round(tokens / step_s, 1), "achieved_gflops": round(gflops, 1),
            "mfu": round(gflops / peaks[f"{precision}_peak_gflops"], 4),
            "mfu_vs_bf16_peak": round(gflops / peaks["bf16_peak_gflops"], 4),
            "mfu_vs_fp32_peak": round(gflops / peaks["fp32_peak_gflops"], 4)}


def bench_train(mcfg: ModelConfig, batch: int, peaks: dict, warmup: int, rounds: int, per_round: int, llama: bool,
                compiled: bool = False) -> dict:
    """worldloom's training step, and (``llama``) transformers' LlamaForCausalLM's with the same
    weights, and (``compiled``) worldloom's model under ``torch.compile`` as ``train.compile=true``
    runs it, timed in alternating rounds at fp32 and bf16."""
    torch.manual_seed(0)
    probe = LWM(mcfg)
    fpt = flops_per_token(probe)
    train: dict = {"model": to_dict(mcfg), "batch": batch, "warmup_steps": warmup, "timed_steps": rounds * per_round,
                   "rounds": rounds, "steps_per_round": per_round, "params_total": probe.num_params(),
                   "flop_params_N": flop_params(probe), "flops_per_token": fpt,
                   "flops_formula": "6*N + 12*n_layer*d_model*context, N = non-embedding params + output head"}
    if llama:
        hf = llama_trainee(mcfg, probe).model
        n = llama_flop_params(hf)
        train["llama"] = {"attn_implementation": hf.config._attn_implementation, "params_total": sum(p.numel() for p in hf.parameters()),
                          "flop_params_N": n, "flops_per_token": 6 * n + 12 * mcfg.n_layer * mcfg.d_model * mcfg.context}
        train["ratio_vs_llama"] = {}
        del hf
    for precision in ("fp32", "bf16"):
        torch.manual_seed(0)
        wl = LWM(mcfg)
        trainees = [worldloom_trainee(wl)] + ([llama_trainee(mcfg, wl)] if llama else []) + (
            [compiled_trainee(mcfg, wl)] if compiled else [])
        data = lm_batch(mcfg.vocab_size, batch, mcfg.context)
        recs = alternate_rounds(trainees, data, batch, precision, warmup, rounds, per_round)
        for t, rec in zip(trainees, recs):
            dest = train if t.name == "worldloom" else train.setdefault(t.name, {"flops_per_token": fpt})
            r = dest[precision] = train_figures(rec["times"], batch * mcfg.context, dest["flops_per_token"], peaks, precision)
            r["first_loss"] = rec["first_loss"]
            log(f"  {precision} {t.name:9s}: {r['tokens_per_s']:9.1f} tok/s, step {r['step_s_median']:.3f} s (median), "
                f"{r['achieved_gflops']:.1f} GFLOP/s, MFU {r['mfu']:.1%} of the {precision} peak "
                f"({r['mfu_vs_bf16_peak']:.1%} of bf16's), first loss {rec['first_loss']}")
        if llama:
            ratio = train[precision]["tokens_per_s"] / train["llama"][precision]["tokens_per_s"]
            train["ratio_vs_llama"][precision] = round(ratio, 3)
            log(f"  {precision} worldloom / llama tokens/s: {ratio:.2f}x")
        if compiled:
            speedup = train["compiled"][precision]["tokens_per_s"] / train[precision]["tokens_per_s"]
            train.setdefault("compile_speedup", {})[precision] = round(speedup, 3)
            log(f"  {precision} worldloom compiled / eager tokens/s: {speedup:.2f}x")
    return train


def compiled_trainee(mcfg: ModelConfig, weights_from: LWM) -> Trainee:
    """worldloom's model with the same weights, called through ``torch.compile`` (train.compile=true)."""
    model = LWM(mcfg)
    model.load_state_dict(weights_from.state_dict())
    net = torch.compile(model)
    return Trainee("compiled", model, lambda d: net(d["input"]), lambda out, d: language_model_loss(out, d).total)


# ---------------------------------------------------------------- 3. decode


def prompts_for(batch: int, length: int, vocab: int) -> list[list[int]]:
    return [[(7 * r + 3 * j + 1) % vocab for j in range(length)] for r in range(batch)]


def time_runs(fn, warmup: int, reps: int) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def worldloom_decode(model: LWM, batch: int, prompt_len: int, new: int, use_cache: bool, warmup: int, reps: int,
                     compile: bool = False) -> tuple[float, list[list[int]]]:
    prompts = prompts_for(batch, prompt_len, model.cfg.vocab_size)
    sc = SamplingConfig(max_new_tokens=new, temperature=0.0)
    got: list = []

    def once():
        got.clear()
        for nxt in generate_ids(model, prompts, sc, use_cache=use_cache, compile=compile):
            got.append(nxt)

    s = time_runs(once, warmup, reps)
    assert len(got) == new
    tokens = torch.stack(got, dim=1).tolist()  # (B, new)
    return batch * new / s, tokens


def bench_decode(mcfg: ModelConfig, prompt_len: int, new: int, batches: list[int], uncached_new: int, warmup: int, reps: int) -> dict:
    torch.manual_seed(0)
    base = LWM(mcfg).eval()
    out = {}
    for name, dtype in DTYPES.items():
        model = LWM(mcfg).eval()
        model.load_state_dict(base.state_dict())
        model.to(dtype)
        row = {}
        for b in batches:
            tps, _ = worldloom_decode(model, b, prompt_len, new, True, warmup, reps)
            row[f"cached_b{b}_tokens_per_s"] = round(tps, 1)
            log(f"  worldloom {name} cached   batch {b}: {tps:9.1f} tok/s")
        tps, _ = worldloom_decode(model, 1, prompt_len, uncached_new, False, min(warmup, 1), reps)
        row["uncached_b1_tokens_per_s"] = round(tps, 1)
        row["uncached_new_tokens"] = uncached_new
        log(f"  worldloom {name} uncached batch 1: {tps:9.1f} tok/s ({uncached_new} new tokens)")
        out[name] = row
    return out


# ---------------------------------------------------------------- 4. Hugging Face


def build_run(folder: Path, mcfg: ModelConfig) -> Path:
    """A run folder holding a randomly initialised model, as `worldloom train` would leave it."""
    from worldloom.tokenize import TextTokenizer
    from worldloom.checkpoint import save_checkpoint

    tok = TextTokenizer.train("char", CHARS)
    cfg = RunConfig(name="bench", out_dir=str(folder), model=ModelConfig(**{**to_dict(mcfg), "vocab_size": tok.vocab_size}))
    run_dir = cfg.run_dir
    run_dir.mkdir(parents=True)
    tok.save(run_dir / "tokenizer")
    save_yaml(to_dict(cfg), run_dir / "config.yaml")
    torch.manual_seed(0)
    model = LWM(cfg.model)
    save_checkpoint(run_dir, model, None, {"step": 0, "elapsed": 0.0, "precision": "fp32", "val_loss": None})
    return run_dir


def bench_hf(mcfg: ModelConfig, prompt_len: int, new: int, batches: list[int], warmup: int, reps: int, compile: bool = False) -> dict:
    import transformers
    from transformers import LlamaForCausalLM

    from worldloom.export.hf import export_hf
    from worldloom.run import load_run

    transformers.logging.set_verbosity_error()
    transformers.logging.disable_progress_bar()
    out: dict = {}
    with tempfile.TemporaryDirectory() as tmp:
        run_dir = build_run(Path(tmp), mcfg)
        run = load_run(run_dir)
        export_dir = Path(tmp) / "hf"
        export_hf(run, export_dir)
        hf_base = LlamaForCausalLM.from_pretrained(export_dir).eval()
        vocab = run.model.cfg.vocab_size
        out["vocab_size"] = vocab
        out["attn_implementation"] = getattr(hf_base.config, "_attn_implementation", None)
        wl_state = run.model.state_dict()
        del hf_base
        for name, dtype in DTYPES.items():
            wl = LWM(run.model.cfg).eval()
            wl.load_state_dict(wl_state)
            wl.to(dtype)
            hf = LlamaForCausalLM.from_pretrained(export_dir).eval().to(dtype)
            hf.generation_config.eos_token_id = None  # random weights: never stop early
            row: dict = {}
            for b in batches:
                prompts = prompts_for(b, prompt_len, vocab)
                ids = torch.tensor(prompts)
                mask = torch.ones_like(ids)
                res: dict = {}

                def hf_once():
                    with torch.inference_mode():
                        res["out"] = hf.generate(input_ids=ids, attention_mask=mask, max_new_tokens=new, min_new_tokens=new,
                                                 do_sample=False, use_cache=True, pad_token_id=0)

                s = time_runs(hf_once, warmup, reps)
                assert res["out"].shape == (b, prompt_len + new), res["out"].shape
                hf_tps = b * new / s
                wl_tps, wl_tokens = worldloom_decode(wl, b, prompt_len, new, True, warmup, reps)
                hf_tokens = res["out"][:, prompt_len:].tolist()
                agree = sum(x == y for rw, rh in zip(wl_tokens, hf_tokens) for x, y in zip(rw, rh)) / (b * new)
                row[f"worldloom_b{b}_tokens_per_s"] = round(wl_tps, 1)
                row[f"hf_b{b}_tokens_per_s"] = round(hf_tps, 1)
                row[f"ratio_b{b}"] = round(wl_tps / hf_tps, 3)
                row[f"greedy_agreement_b{b}"] = round(agree, 4)
                log(f"  {name} batch {b}: worldloom {wl_tps:9.1f} tok/s, HF generate {hf_tps:9.1f} tok/s, "
                    f"ratio {wl_tps / hf_tps:5.2f}, greedy tokens agreeing {agree:.1%}")
                if compile:  # the first (warm-up) call pays the compilation
                    c_tps, c_tokens = worldloom_decode(wl, b, prompt_len, new, True, max(warmup, 1), reps, compile=True)
                    c_agree = sum(x == y for rw, rh in zip(c_tokens, hf_tokens) for x, y in zip(rw, rh)) / (b * new)
                    row[f"worldloom_compiled_b{b}_tokens_per_s"] = round(c_tps, 1)
                    row[f"ratio_compiled_b{b}"] = round(c_tps / hf_tps, 3)
                    row[f"greedy_agreement_compiled_b{b}"] = round(c_agree, 4)
                    log(f"  {name} batch {b}: worldloom compiled {c_tps:9.1f} tok/s, ratio {c_tps / hf_tps:5.2f}, "
                        f"greedy tokens agreeing {c_agree:.1%}")
            out[name] = row
    return out


# ---------------------------------------------------------------- main


def _row(label: str, fp32, bf16, fmt: str) -> str:
    return f"{label:58s} {format(fp32, fmt):>12s} {format(bf16, fmt):>12s}"


def _train_rows(tr: dict) -> list[str]:
    tag = f"B={tr['batch']}x{tr['model']['context']}"
    rows = [(f"train tokens/s ({tag})", "tokens_per_s", "12.1f"), ("train achieved GFLOP/s", "achieved_gflops", "12.1f"),
            ("train MFU vs bf16 peak", "mfu_vs_bf16_peak", "12.1%"), ("train MFU vs fp32 peak", "mfu_vs_fp32_peak", "12.1%"),
            ("train MFU vs its own dtype's peak", "mfu", "12.1%")]
    lines = [_row(label, tr["fp32"][key], tr["bf16"][key], fmt) for label, key, fmt in rows]
    ll = tr.get("llama")
    if ll:
        lines += [_row(f"llama (transformers, {ll['attn_implementation']}) train tokens/s", ll["fp32"]["tokens_per_s"],
                       ll["bf16"]["tokens_per_s"], "12.1f"),
                  _row("llama train MFU vs its own dtype's peak", ll["fp32"]["mfu"], ll["bf16"]["mfu"], "12.1%"),
                  _row("worldloom / llama train tokens/s (target >= 1.2)", tr["ratio_vs_llama"]["fp32"],
                       tr["ratio_vs_llama"]["bf16"], "12.2f")]
    if "compile_speedup" in tr:
        lines += [_row("worldloom compiled (train.compile) tokens/s", tr["compiled"]["fp32"]["tokens_per_s"],
                       tr["compiled"]["bf16"]["tokens_per_s"], "12.1f"),
                  _row("compiled / eager train tokens/s", tr["compile_speedup"]["fp32"], tr["compile_speedup"]["bf16"], "12.2f")]
    return lines


def fmt_table(res: dict) -> str:
    mm = res["matmul"]
    lines = [f"{'figure':58s} {'fp32':>12s} {'bf16':>12s}", "-" * 84,
             _row("matmul peak GFLOP/s", mm["fp32_peak_gflops"], mm["bf16_peak_gflops"], "12.1f")]
    lines += _train_rows(res["train"])
    de = res.get("decode", {})
    for key in de.get("fp32", {}):
        if key.endswith("tokens_per_s"):
            label = "decode " + key.replace("_tokens_per_s", "").replace("_", " ") + " tok/s (model.to(dtype))"
            lines.append(f"{label:58s} {de['fp32'][key]:12.1f} {de['bf16'][key]:12.1f}")
    hf = res.get("hf")
    if hf and "fp32" in hf:
        for key in hf["fp32"]:
            if key.endswith("tokens_per_s"):
                label = key.replace("_tokens_per_s", "").replace("_", " ") + f" tok/s (vocab {hf['vocab_size']})"
                lines.append(f"{label:58s} {hf['fp32'][key]:12.1f} {hf['bf16'][key]:12.1f}")
            elif key.startswith("ratio"):
                label = "worldloom / HF " + key.replace("ratio_", "")
                lines.append(f"{label:58s} {hf['fp32'][key]:12.2f} {hf['bf16'][key]:12.2f}")
    return "\n".join(lines)


def settings(quick: bool) -> dict:
    """Shapes and repetitions of a full or a --quick run."""
    mcfg, batch = train_shapes(quick)
    if quick:
        return dict(mcfg=mcfg, batch=batch, train_warmup=1, rounds=2, per_round=1,
                    shapes=[(256, 256, 256), (256, 64, 192)], mm_reps=3,
                    prompt_len=8, new=24, uncached_new=24, batches=[1, 2], warmup=1, reps=1)
    tokens, d, ff = batch * mcfg.context, mcfg.d_model, mcfg.ff_dim
    qkv = (mcfg.n_head + 2 * mcfg.kv_heads) * mcfg.head_dim
    return dict(mcfg=mcfg, batch=batch, train_warmup=2, rounds=5, per_round=2,
                shapes=[(2048, 2048, 2048), (tokens, d, qkv), (tokens, d, 2 * ff), (tokens, ff, d), (tokens, d, d)], mm_reps=5,
                prompt_len=16, new=200, uncached_new=200, batches=[1, 8], warmup=1, reps=3)


def parse_args(argv):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="tiny shapes and few repetitions (< 30 s), for a smoke test")
    ap.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "results" / "foundation.json")
    ap.add_argument("--threads", type=int, default=0, help="torch CPU threads (0 = torch's default)")
    ap.add_argument("--skip-hf", action="store_true",
                    help="leave out every Hugging Face comparison (the Llama training step and generate)")
    ap.add_argument("--train-only", action="store_true", help="matmul peaks and the training steps only (no decoding)")
    ap.add_argument("--compile", action="store_true", help="also time the training step under torch.compile (train.compile=true)")
    ap.add_argument("--rounds", type=int, default=0, help="alternating training rounds (0 = 5, or 2 with --quick)")
    ap.add_argument("--no-compile", action="store_true", help="leave out worldloom's torch.compile decode (default: on, off with --quick)")
    args = ap.parse_args(argv)
    if args.rounds < 0:
        ap.error("--rounds must be >= 0 (0 = the default)")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    t_start = time.perf_counter()
    st = settings(args.quick)
    mcfg, batch = st["mcfg"], st["batch"]
    res: dict = {"date_utc": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                 "quick": args.quick, "machine": machine_info()}
    m = res["machine"]
    log(f"worldloom foundation benchmark{' (--quick)' if args.quick else ''} - {res['date_utc']}")
    log(f"machine: {m['cpu_model']}, {m['cores']} cores, {m['torch_threads']} torch threads, {m['platform']}, "
        f"torch {m['torch']}, transformers {m['transformers']}, load average {m['loadavg_at_start']}")

    log("\n1. matmul")
    res["matmul"] = bench_matmul(st["shapes"], st["mm_reps"])

    llama = not args.skip_hf and m["transformers"] is not None
    log(f"\n2. training step, batch {batch} x {mcfg.context}" + (", worldloom and transformers' Llama in alternating rounds" if llama else ""))
    res["train"] = bench_train(mcfg, batch, res["matmul"], st["train_warmup"], args.rounds or st["rounds"], st["per_round"], llama, args.compile)

    prompt_len, new, warmup, reps = st["prompt_len"], st["new"], st["warmup"], st["reps"]
    if not args.train_only:
        log(f"\n3. greedy decode (worldloom), prompt {prompt_len}, {new} new tokens")
        res["decode"] = {"prompt_len": prompt_len, "new_tokens": new,
                         **bench_decode(mcfg, prompt_len, new, st["batches"], st["uncached_new"], warmup, reps)}
    if not (args.skip_hf or args.train_only):
        log(f"\n4. worldloom vs Hugging Face generate (exported copy), prompt {prompt_len}, {new} new tokens")
        res["hf"] = {"prompt_len": prompt_len, "new_tokens": new, **bench_hf(mcfg, prompt_len, new, st["batches"], warmup, reps,
                                                                                 compile=not (args.quick or args.no_compile))}

    res["machine"]["loadavg_at_end"] = [round(x, 2) for x in os.getloadavg()]
    res["wall_seconds"] = round(time.perf_counter() - t_start, 1)
    log("\n" + fmt_table(res))
    log(f"\n{m['cpu_model']}, {m['cores']} cores, torch {m['torch']}; {res['date_utc']}; "
        f"load average {m['loadavg_at_start']} -> {m['loadavg_at_end']}; {res['wall_seconds']} s")
    save_json(args.out, res)
    return 0


if __name__ == "__main__":
    sys.exit(main())
