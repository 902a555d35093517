#!/usr/bin/env python
"""Foundation benchmark: matmul peak, training throughput and MFU, decode speed, and
worldloom decode against Hugging Face `generate` on the exported copy of the same model.

All figures come from one run on one machine (printed with the results). Run::

    python benchmarks/bench_foundation.py                 # full run, a few minutes on 2 cores
    python benchmarks/bench_foundation.py --quick         # tiny shapes, < 30 s (smoke test)
    python benchmarks/bench_foundation.py --out my.json   # where to write the JSON

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
* decode: `worldloom.decode.generate_ids`, greedy, prompts of equal length (no padding);
  the time covers prefill + all new tokens; tokens/s = batch * new tokens / time.
* hf: the model is saved as a run folder, loaded with `load_run`, exported with
  `worldloom.export.hf.export_hf`, loaded with `transformers.LlamaForCausalLM`, and
  timed with `generate(do_sample=False, use_cache=True, min_new_tokens=max_new_tokens)`;
  the worldloom figure it is compared with uses the very same weights (`run.model`).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

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


def flop_params(model: LWM) -> int:
    """N of the PaLM formula: non-embedding parameters plus the output head."""
    n = model.num_params(non_embedding=True)
    if model.head.weight is model.embed.weight:  # tied: num_params counted it once, as the embedding
        n += model.head.weight.numel()
    return n


def flops_per_token(model: LWM) -> int:
    c = model.cfg
    return 6 * flop_params(model) + 12 * c.n_layer * c.d_model * c.context


def time_train_steps(model: LWM, batch: int, context: int, precision: str, warmup: int, steps: int) -> list[float]:
    """Seconds of each timed full training step (forward, backward, clip, AdamW) on fixed random tokens."""
    model.train()
    tc = TrainConfig(batch_size=batch)
    opt = make_optimizer(model, tc)
    g = torch.Generator().manual_seed(0)
    x = torch.randint(model.cfg.vocab_size, (batch, context + 1), generator=g)
    data = {"input": x[:, :-1].contiguous(), "target": x[:, 1:].contiguous()}
    times = []
    for i in range(warmup + steps):
        t = time.perf_counter()
        with autocast(precision, CPU):
            out = language_model_loss(model(data["input"]), data)
        out.total.backward()
        out.total.item()
        torch.nn.utils.clip_grad_norm_(model.parameters(), tc.grad_clip)
        opt.step()
        opt.zero_grad(set_to_none=True)
        if i >= warmup:
            times.append(time.perf_counter() - t)
    return times


def bench_train(mcfg: ModelConfig, batch: int, precision: str, warmup: int, steps: int) -> dict:
    torch.manual_seed(0)
    times = time_train_steps(LWM(mcfg), batch, mcfg.context, precision, warmup, steps)
    step_s = statistics.median(times)
    tokens = batch * mcfg.context
    return {"step_s_median": round(step_s, 4), "step_s_all": [round(s, 4) for s in times],
            "tokens_per_s": round(tokens / step_s, 1)}


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


def fmt_table(res: dict) -> str:
    lines = []
    mm = res["matmul"]
    lines.append(f"{'figure':58s} {'fp32':>12s} {'bf16':>12s}")
    lines.append("-" * 84)
    lines.append(f"{'matmul peak GFLOP/s':58s} {mm['fp32_peak_gflops']:12.1f} {mm['bf16_peak_gflops']:12.1f}")
    tr = res["train"]
    tag = f"B={tr['batch']}x{tr['model']['context']}"
    lines.append(f"{'train tokens/s (' + tag + ')':58s} {tr['fp32']['tokens_per_s']:12.1f} {tr['bf16']['tokens_per_s']:12.1f}")
    lines.append(f"{'train achieved GFLOP/s':58s} {tr['fp32']['achieved_gflops']:12.1f} {tr['bf16']['achieved_gflops']:12.1f}")
    lines.append(f"{'train MFU vs bf16 peak':58s} {tr['fp32']['mfu_vs_bf16_peak']:12.1%} {tr['bf16']['mfu_vs_bf16_peak']:12.1%}")
    lines.append(f"{'train MFU vs fp32 peak':58s} {tr['fp32']['mfu_vs_fp32_peak']:12.1%} {tr['bf16']['mfu_vs_fp32_peak']:12.1%}")
    de = res["decode"]
    for key in de["fp32"]:
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


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="tiny shapes and few repetitions (< 30 s), for a smoke test")
    ap.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "results" / "foundation.json")
    ap.add_argument("--threads", type=int, default=0, help="torch CPU threads (0 = torch's default)")
    ap.add_argument("--skip-hf", action="store_true", help="leave out the Hugging Face comparison")
    ap.add_argument("--no-compile", action="store_true", help="leave out worldloom's torch.compile decode (default: on, off with --quick)")
    args = ap.parse_args(argv)
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    t_start = time.perf_counter()

    if args.quick:
        mcfg = ModelConfig(n_layer=2, n_head=2, d_model=64, context=64, vocab_size=65, dropout=0.0)
        batch, train_warmup, train_steps = 4, 1, 2
        shapes, mm_reps = [(256, 256, 256), (256, 64, 192)], 3
        prompt_len, new, uncached_new, batches, warmup, reps = 8, 24, 24, [1, 2], 1, 1
    else:
        mcfg = ModelConfig(n_layer=6, n_head=6, d_model=384, context=256, vocab_size=65, dropout=0.0)
        batch, train_warmup, train_steps = 16, 2, 5
        tokens = batch * mcfg.context
        ff = mcfg.ff_dim
        shapes = [(2048, 2048, 2048), (tokens, 384, 1152), (tokens, 384, 2 * ff), (tokens, ff, 384), (tokens, 384, 384)]
        mm_reps = 5
        prompt_len, new, uncached_new, batches, warmup, reps = 16, 200, 200, [1, 8], 1, 3

    res: dict = {"date_utc": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                 "quick": args.quick, "machine": machine_info()}
    m = res["machine"]
    log(f"worldloom foundation benchmark{' (--quick)' if args.quick else ''} - {res['date_utc']}")
    log(f"machine: {m['cpu_model']}, {m['cores']} cores, {m['torch_threads']} torch threads, {m['platform']}, "
        f"torch {m['torch']}, transformers {m['transformers']}, load average {m['loadavg_at_start']}")

    log("\n1. matmul")
    res["matmul"] = bench_matmul(shapes, mm_reps)

    log(f"\n2. training step, batch {batch} x {mcfg.context}")
    probe = LWM(mcfg)
    fpt = flops_per_token(probe)
    train: dict = {"model": to_dict(mcfg), "batch": batch, "warmup_steps": train_warmup, "timed_steps": train_steps,
                   "params_total": probe.num_params(), "flop_params_N": flop_params(probe), "flops_per_token": fpt,
                   "flops_formula": "6*N + 12*n_layer*d_model*context, N = non-embedding params + output head"}
    del probe
    for precision in ("fp32", "bf16"):
        r = bench_train(mcfg, batch, precision, train_warmup, train_steps)
        gflops = r["tokens_per_s"] * fpt / 1e9
        r["achieved_gflops"] = round(gflops, 1)
        r["mfu_vs_bf16_peak"] = round(gflops / res["matmul"]["bf16_peak_gflops"], 4)
        r["mfu_vs_fp32_peak"] = round(gflops / res["matmul"]["fp32_peak_gflops"], 4)
        train[precision] = r
        log(f"  {precision}: {r['tokens_per_s']:9.1f} tok/s, step {r['step_s_median']:.3f} s (median), {gflops:.1f} GFLOP/s, "
            f"MFU {r['mfu_vs_bf16_peak']:.1%} of bf16 peak, {r['mfu_vs_fp32_peak']:.1%} of fp32 peak")
    res["train"] = train

    log(f"\n3. greedy decode (worldloom), prompt {prompt_len}, {new} new tokens")
    res["decode"] = {"prompt_len": prompt_len, "new_tokens": new,
                     **bench_decode(mcfg, prompt_len, new, batches, uncached_new, warmup, reps)}

    if not args.skip_hf:
        log(f"\n4. worldloom vs Hugging Face generate (exported copy), prompt {prompt_len}, {new} new tokens")
        res["hf"] = {"prompt_len": prompt_len, "new_tokens": new, **bench_hf(mcfg, prompt_len, new, batches, warmup, reps,
                                                                                 compile=not (args.quick or args.no_compile))}

    res["machine"]["loadavg_at_end"] = [round(x, 2) for x in os.getloadavg()]
    res["wall_seconds"] = round(time.perf_counter() - t_start, 1)
    log("\n" + fmt_table(res))
    log(f"\n{m['cpu_model']}, {m['cores']} cores, torch {m['torch']}; {res['date_utc']}; "
        f"load average {m['loadavg_at_start']} -> {m['loadavg_at_end']}; {res['wall_seconds']} s")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(res, indent=2) + "\n")
    log(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
