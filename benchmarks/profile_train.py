#!/usr/bin/env python
"""Where a training step's time goes: worldloom's and transformers' Llama's, bucket by bucket.

Runs N full training steps (the very step bench_foundation.py times: same shapes, weights,
autocast, AdamW groups, clipping) under `torch.profiler` (CPU, no shapes, no stacks) and
prints, per model, the milliseconds per step of each bucket and its share of the step,
then the top ops by self CPU time. Run::

    python benchmarks/profile_train.py                        # bf16, 6 x 384, batch 16 x 256, both models
    python benchmarks/profile_train.py --precision fp32 --steps 5 --model worldloom
    python benchmarks/profile_train.py --quick --json out.json  # tiny shapes (smoke test)

How a bucket is found. Every op's *self* time (its own kernel, not its children's) goes to
exactly one bucket, so the buckets add up to the profiled time; what no op covers (Python
between ops outside any range, the profiler's own bookkeeping) is "unaccounted". Ranges
(`record_function`) mark the phases of the step (forward, loss, backward, clip, optimizer,
zero_grad) and, for this profile only, parts of the models: norm modules, attention modules,
MLP modules and the rotary functions are wrapped here (no model code is changed). A
backward op inherits the range of the forward op that made its autograd node (the
profiler's sequence numbers), so the backward of the rotary counts as rotary, the backward
of the loss as loss. The rules, first match wins:

    optimizer                   anything inside clip, optimizer or zero_grad
    matmul                      aten::mm / addmm / bmm / matmul / linear / baddbmm by name
    attention (sdpa)            scaled_dot_product_attention (flash/math/...) and backward, and what runs inside them
    loss / rotary / norm        inside (or the backward of something inside) that range
    dtype casts                 aten::to / _to_copy / type_as and what they run (autocast's casts)
    autograd engine             autograd node bookkeeping, gradient accumulation
    attention (other ops)       the attention module's other ops: q/k/v slices, views, transposes,
                                copies, the zero-filled gradients of slices
    swiglu (non-matmul)         the MLP module's other ops: silu, the product, the split
    python (in no op)           time inside the forward/backward ranges that no op covers
    embedding, copies (copy_/clone/contiguous), views, elementwise & other aten, other

Profiled steps run slower than plain ones (every op is recorded); the plain step time is
measured first and printed beside the profiled one. Never trust a profile taken while
other programs compete for the cores.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import statistics
import sys
import time
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile, record_function

from bench_foundation import lm_batch, llama_trainee, log, machine_info, save_json, train_shapes, train_step, worldloom_trainee

from worldloom.config import TrainConfig
from worldloom.model import LWM
from worldloom.train.optim import make_optimizer

PHASES = {"forward", "loss", "backward", "clip", "optimizer", "zero_grad"}
OPTIMIZER_PHASES = {"clip", "optimizer", "zero_grad"}
LABELS = {"loss": "loss", "rotary": "rotary", "norm": "norm", "attn": "attention (other ops)", "mlp": "swiglu (non-matmul)"}
MODULE_LABELS = {"RMSNorm": "norm", "LlamaRMSNorm": "norm", "Attention": "attn", "LlamaAttention": "attn",
                 "SwiGLU": "mlp", "LlamaMLP": "mlp", "LlamaRotaryEmbedding": "rotary"}
MATMUL_OPS = {"aten::mm", "aten::addmm", "aten::bmm", "aten::matmul", "aten::linear", "aten::baddbmm", "aten::mv", "aten::addmv"}
CAST_OPS = {"aten::to", "aten::_to_copy", "aten::type_as"}  # and everything they run
COPY_OPS = {"aten::copy_", "aten::clone", "aten::contiguous"}
VIEW_OPS = {"aten::" + n for n in ("view", "reshape", "_reshape_alias", "_unsafe_view", "transpose", "t", "permute", "expand",
                                    "as_strided", "unsqueeze", "squeeze", "split", "split_with_sizes", "chunk", "narrow",
                                    "slice", "select", "unbind", "flatten", "detach", "alias", "resolve_conj", "resolve_neg")}
BUCKETS = ["matmul", "attention (sdpa)", "attention (other ops)", "rotary", "norm", "swiglu (non-matmul)", "loss", "optimizer",
           "dtype casts", "copies", "embedding", "views", "elementwise & other aten", "autograd engine", "python (in no op)",
           "other", "unaccounted"]


# ---------------------------------------------------------------- labelling (this profile only)


def _ranged(fn, name: str):
    @functools.wraps(fn)
    def run(*args, **kwargs):
        with record_function(name):
            return fn(*args, **kwargs)

    return run


@contextlib.contextmanager
def labelled(model: torch.nn.Module):
    """Wrap the norm, attention, MLP and rotary modules of `model`, and both libraries' rotary
    functions, in profiler ranges; undone on exit."""
    import worldloom.backbones.transformer as wl

    patched = [(wl, "apply_rope")]
    try:
        import transformers.models.llama.modeling_llama as hf

        patched.append((hf, "apply_rotary_pos_emb"))
    except ImportError:
        pass
    saved = [(owner, name, getattr(owner, name)) for owner, name in patched]
    wrapped = [m for m in model.modules() if type(m).__name__ in MODULE_LABELS]
    try:
        for owner, name, fn in saved:
            setattr(owner, name, _ranged(fn, "rotary"))
        for m in wrapped:
            m.forward = _ranged(m.forward, MODULE_LABELS[type(m).__name__])
        yield
    finally:
        for owner, name, fn in saved:
            setattr(owner, name, fn)
        for m in wrapped:
            del m.forward  # the instance attribute; the class's forward shows again


# ---------------------------------------------------------------- classification


def _is_attention(name: str) -> bool:
    key = name.lower().replace("_", "")
    return "scaleddotproduct" in key or "flashattention" in key or "efficientattention" in key


def _contexts(events) -> dict:
    """id -> (phase, label, inside attention, inside a dtype cast) of every event, inherited from
    its ancestors; a backward event takes the label of the forward op whose autograd node it runs."""
    base: dict = {}

    def ctx(e):
        if e.id not in base:
            p = ctx(e.cpu_parent) if e.cpu_parent is not None else (None, None, False, False)
            base[e.id] = (e.name if e.name in PHASES else p[0], e.name if e.name in LABELS else p[1],
                          p[2] or _is_attention(e.name), p[3] or e.name in CAST_OPS)
        return base[e.id]

    for e in events:
        ctx(e)
    forward = {}  # sequence number -> (label, attention) of the outermost forward op that has it
    for e in events:
        phase, label, attn, _ = base[e.id]
        if phase in ("forward", "loss") and e.sequence_nr >= 0:
            forward.setdefault(e.sequence_nr, (label, attn))
    linked: dict = {}

    def link(e):
        if e.id not in linked:
            up = link(e.cpu_parent) if e.cpu_parent is not None else None
            own = forward.get(e.sequence_nr) if base[e.id][0] == "backward" and e.sequence_nr >= 0 else None
            linked[e.id] = own or up
        return linked[e.id]

    out = {}
    for e in events:
        phase, label, attn, cast = base[e.id]
        from_fwd = link(e)
        if label is None and from_fwd is not None:
            label, attn = from_fwd[0], attn or from_fwd[1]
        out[e.id] = (phase, label, attn, cast)
    return out


def bucket_of(name: str, phase, label, attention: bool, cast: bool) -> str:
    """The bucket of one event's self time (the rules of the module docstring, in order)."""
    if phase in OPTIMIZER_PHASES:
        return "optimizer"
    if name in MATMUL_OPS:
        return "matmul"
    if attention or _is_attention(name):
        return "attention (sdpa)"
    if label in ("loss", "rotary", "norm"):
        return LABELS[label]
    if cast:
        return "dtype casts"
    if name.startswith("autograd::") or "Backward" in name or "AccumulateGrad" in name or name == "detach":
        return "autograd engine"
    if label is not None:
        return LABELS[label]
    if name in PHASES:
        return "python (in no op)"
    if "embedding" in name:
        return "embedding"
    if name in COPY_OPS:
        return "copies"
    if name in VIEW_OPS:
        return "views"
    return "elementwise & other aten" if name.startswith("aten::") else "other"


def buckets(events, wall_us: float, steps: int) -> dict:
    """Bucket -> {"ms_per_step", "pct"} (of the profiled step), "unaccounted" = wall - all self time."""
    ctx = _contexts(events)
    us = dict.fromkeys(BUCKETS, 0.0)
    for e in events:
        us[bucket_of(e.name, *ctx[e.id])] += e.self_cpu_time_total
    us["unaccounted"] = wall_us - sum(us.values())
    return {k: {"ms_per_step": round(v / steps / 1e3, 3), "pct": round(100 * v / wall_us, 2)} for k, v in us.items()}


def top_ops(prof, wall_us: float, steps: int, n: int) -> list[dict]:
    rows = sorted(prof.key_averages(), key=lambda a: a.self_cpu_time_total, reverse=True)[:n]
    return [{"op": a.key, "calls_per_step": round(a.count / steps, 1), "self_ms_per_step": round(a.self_cpu_time_total / steps / 1e3, 3),
             "self_pct": round(100 * a.self_cpu_time_total / wall_us, 2),
             "total_ms_per_step": round(a.cpu_time_total / steps / 1e3, 3)} for a in rows]


# ---------------------------------------------------------------- running


def profile_trainee(t, data: dict, precision: str, warmup: int, steps: int, top: int) -> dict:
    """Warm up, time `steps` plain steps, then profile `steps` more."""
    opt = make_optimizer(t.model, TrainConfig(batch_size=data["input"].shape[0]))
    clip = TrainConfig().grad_clip
    t.model.train()
    for _ in range(warmup):
        train_step(t, opt, data, precision, clip)
    plain = []
    for _ in range(steps):
        start = time.perf_counter()
        train_step(t, opt, data, precision, clip)
        plain.append(time.perf_counter() - start)
    with labelled(t.model), profile(activities=[ProfilerActivity.CPU], record_shapes=False, with_stack=False) as prof:
        start = time.perf_counter()
        for _ in range(steps):
            train_step(t, opt, data, precision, clip, mark=record_function)
        wall_us = (time.perf_counter() - start) * 1e6
    return {"step_ms_plain": round(1e3 * statistics.median(plain), 2), "step_ms_profiled": round(wall_us / steps / 1e3, 2),
            "buckets": buckets(prof.events(), wall_us, steps), "top_ops": top_ops(prof, wall_us, steps, top)}


def fmt_buckets(models: dict) -> str:
    names = list(models)
    head = f"{'bucket':26s}" + "".join(f" {n + ' ms/step':>20s} {'%':>6s}" for n in names)
    lines = [head, "-" * len(head)]
    for b in BUCKETS:
        lines.append(f"{b:26s}" + "".join(f" {models[n]['buckets'][b]['ms_per_step']:20.2f} {models[n]['buckets'][b]['pct']:6.1f}"
                                           for n in names))
    lines.append(f"{'step (profiled)':26s}" + "".join(f" {models[n]['step_ms_profiled']:20.2f} {100.0:6.1f}" for n in names))
    lines.append(f"{'step (plain, median)':26s}" + "".join(f" {models[n]['step_ms_plain']:20.2f} {'':6s}" for n in names))
    return "\n".join(lines)


def fmt_top(name: str, rows: list[dict]) -> str:
    lines = [f"top {len(rows)} ops by self CPU time: {name}",
             f"{'op':58s} {'calls/step':>10s} {'self ms/step':>12s} {'self %':>7s} {'total ms/step':>13s}"]
    lines += [f"{r['op'][:58]:58s} {r['calls_per_step']:10.1f} {r['self_ms_per_step']:12.2f} {r['self_pct']:7.1f} "
              f"{r['total_ms_per_step']:13.2f}" for r in rows]
    return "\n".join(lines)


def parse_args(argv):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--precision", choices=("bf16", "fp32"), default="bf16")
    ap.add_argument("--model", choices=("both", "worldloom", "llama"), default="both")
    ap.add_argument("--steps", type=int, default=0, help="profiled steps (and as many plain ones; 0 = 5, or 2 with --quick)")
    ap.add_argument("--warmup", type=int, default=2, help="untimed steps first")
    ap.add_argument("--top", type=int, default=25, help="how many ops in the top list")
    ap.add_argument("--quick", action="store_true", help="tiny shapes (bench_foundation's --quick), for a smoke test")
    ap.add_argument("--threads", type=int, default=0, help="torch CPU threads (0 = torch's default)")
    ap.add_argument("--json", type=Path, help="also write the figures here")
    args = ap.parse_args(argv)
    if args.steps < 0 or args.warmup < 0 or args.top < 1:
        ap.error("--steps and --warmup must be >= 0, --top >= 1")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    steps = args.steps or (2 if args.quick else 5)
    warmup = min(args.warmup, 1) if args.quick else args.warmup
    mcfg, batch = train_shapes(args.quick)
    torch.manual_seed(0)
    wl = LWM(mcfg)
    trainees = {"worldloom": lambda: worldloom_trainee(wl), "llama": lambda: llama_trainee(mcfg, wl)}
    names = list(trainees) if args.model == "both" else [args.model]
    data = lm_batch(mcfg.vocab_size, batch, mcfg.context)
    machine = machine_info()
    log(f"profile of the training step: {mcfg.n_layer} layers x {mcfg.d_model}, batch {batch} x {mcfg.context}, "
        f"{args.precision}, {steps} steps after {warmup} warm-up; {machine['cpu_model']}, {machine['torch_threads']} threads, "
        f"torch {machine['torch']}, transformers {machine['transformers']}, load average {machine['loadavg_at_start']}")
    models = {}
    for name in names:
        models[name] = profile_trainee(trainees[name](), data, args.precision, warmup, steps, args.top)
    log("\n" + fmt_buckets(models))
    for name in names:
        log("\n" + fmt_top(name, models[name]["top_ops"]))
    if args.json:
        save_json(args.json, {"precision": args.precision, "steps": steps, "warmup": warmup, "batch": batch, "quick": args.quick,
                              "model_config": {k: getattr(mcfg, k) for k in ("n_layer", "n_head", "d_model", "context", "vocab_size")},
                              "machine": machine, "models": models})
    return 0


if __name__ == "__main__":
    sys.exit(main())
