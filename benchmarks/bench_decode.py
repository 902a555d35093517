#!/usr/bin/env python
"""Issue 14's decoding table: every fast-decoding method against plain cached greedy decoding of the
same weights, in one process, on tinyshakespeare prompts.

    python benchmarks/bench_decode.py --dir /tmp/dec              # trains runs/big and runs/small if absent
    python benchmarks/bench_decode.py --dir /tmp/dec --quick      # tiny models, a smoke test (a minute)
    python benchmarks/bench_decode.py --dir /tmp/dec --medusa runs/big-medusa --quant runs/big-int8 runs/big-ternary
    python benchmarks/bench_decode.py --dir /tmp/dec --distilled runs/big-draft   # + drafts made by `tune draft`

Rows (batch 1, greedy, ``--new`` tokens per prompt, the same prompts for every row):
- plain: `decode.generate_ids` with the KV cache (the peer of every ratio);
- draft k=K: speculative decoding with runs/small as the draft (``--draft-tokens``);
- distilled NAME k=K (with ``--distilled RUN ...``): the same with a draft `worldloom tune draft`
  distilled from runs/big's own generations;
- lookup (grounded / open): prompt lookup on prompts that quote a held-out passage and then start
  it again (the continuation can be copied) and on open-ended held-out openings;
- medusa (with ``--medusa RUN``), quantised runs (``--quant RUN ...``: their own plain decoding);
- hf plain / hf assisted / hf lookup (with transformers installed): `generate` of the exported
  Llama copy of the same weights (`worldloom export hf`), plain, ``assistant_model=`` the exported
  draft, ``prompt_lookup_num_tokens=``.
Each row reports tokens/s (median over ``--repeats`` passes over the prompts, methods alternated in
each pass so drift hits all alike), the ratio to plain, the acceptance and tokens per target pass,
and whether its text is token-for-token the plain text. Writes DIR/decode.json and prints Markdown.
Time nothing else while it runs: on 2 cores a concurrent process slows torch 10x.
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data" / "tinyshakespeare.txt"

# The target (25.9M parameters) and a draft ~10x smaller (2.6M), the same tokenizer and data (batches of
# 16 x 256 characters); the target gets 200 steps (~12 minutes alone on 2 cores), the draft 600.
BIG = ["model.n_layer=8", "model.d_model=512", "model.n_head=8", "train.max_steps=200", "train.max_minutes=0",
       "train.lr=0.001", "train.warmup_steps=20", "train.eval_interval=100", "train.precision=fp32"]
SMALL = ["model.n_layer=4", "model.d_model=224", "model.n_head=4", "train.max_steps=600", "train.max_minutes=40",
         "train.eval_interval=200"]
QUICK = ["model.n_layer=2", "model.d_model=64", "model.n_head=2", "model.context=128", "train.max_steps=40",
         "train.eval_interval=20", "train.batch_size=8"]
QUICK_SMALL = ["model.n_layer=1", "model.d_model=32", "model.n_head=2", "model.context=128", "train.max_steps=40",
               "train.eval_interval=20", "train.batch_size=8"]


def train(dir_: Path, name: str, overrides: list[str], data: Path, log) -> Path:
    run = dir_ / "runs" / name
    if (run / "checkpoints").exists():
        return run
    cmd = [sys.executable, "-m", "worldloom", "train", "shakespeare-char", f"data.path={data}",
           f"out_dir={dir_ / 'runs'}", f"name={name}", *overrides, "--no-progress"]
    log("$ " + " ".join(cmd[2:]))
    subprocess.run(cmd, check=True, cwd=ROOT)
    return run


def prompts(text: str, n: int, length: int) -> dict[str, list[str]]:
    """Held-out prompts (the last 10% of the text): open-ended openings and grounded ones (a passage,
    a blank line, then the passage's first line again: its continuation is in the prompt)."""
    held = text[int(len(text) * 0.9):]
    starts = [held.find("\n\n", i * len(held) // (n + 1)) + 2 for i in range(n)]
    open_, grounded = [], []
    for s in starts:
        open_.append(held[s : s + length])
        passage = held[s : s + 2 * length]
        first = passage.split("\n")[0]
        grounded.append(passage + "\n\n" + first + "\n")
    return {"open": open_, "grounded": grounded}


def decode_row(model, ids: list[int], new: int, drafter=None, k: int = 4, fn=None):
    """(seconds, tokens, stats) of one greedy continuation."""
    from worldloom.decode import SamplingConfig, generate_ids
    from worldloom.inference.speculative import SpecStats

    sc = SamplingConfig(max_new_tokens=new, temperature=0.0)
    stats = SpecStats()
    t = time.perf_counter()
    if fn is not None:
        out = fn(ids, new, stats)
    else:
        out = [int(x) for x in generate_ids(model, [ids], sc, drafter=drafter, draft_tokens=k, stats=stats)]
    return time.perf_counter() - t, out, stats


def hf_row(hf, ids: list[int], new: int, **kw):
    t = time.perf_counter()
    with torch.inference_mode():
        out = hf.generate(torch.tensor([ids]), max_new_tokens=new, min_new_tokens=new, do_sample=False, **kw)
    return time.perf_counter() - t, out[0, len(ids):].tolist(), None


def methods(big, small, args, log) -> dict:
    """name -> (prompt set, callable(ids) -> (seconds, tokens, stats))."""
    from worldloom.inference.speculative import LookupDrafter, ModelDrafter

    m = {"plain": ("open", lambda ids: decode_row(big.model, ids, args.new)),
         "plain (grounded)": ("grounded", lambda ids: decode_row(big.model, ids, args.new)),
         **{f"draft k={k}": ("open", lambda ids, k=k: decode_row(big.model, ids, args.new, ModelDrafter(small.model), k))
            for k in args.draft_tokens},
         "lookup (open)": ("open", lambda ids: decode_row(big.model, ids, args.new, LookupDrafter(), max(args.draft_tokens))),
         "lookup (grounded)": ("grounded", lambda ids: decode_row(big.model, ids, args.new, LookupDrafter(), max(args.draft_tokens)))}
    for d in args.distilled or []:
        from worldloom.run import load_run

        dm = load_run(Path(d)).model
        for k in args.draft_tokens:
            m[f"distilled {Path(d).name} k={k}"] = (
                "open", lambda ids, dm=dm, k=k: decode_row(big.model, ids, args.new, ModelDrafter(dm), k))
    if args.medusa:
        from worldloom.inference.medusa import medusa_ids
        from worldloom.run import load_run

        med = load_run(Path(args.medusa))

        def medusa(ids, new, stats):
            from worldloom.decode import SamplingConfig

            return [int(x) for x in medusa_ids(med.model, [ids], SamplingConfig(max_new_tokens=new, temperature=0.0), stats=stats)]

        m["medusa"] = ("open", lambda ids: decode_row(None, ids, args.new, fn=medusa))
    for q in args.quant or []:
        from worldloom.run import load_run

        qrun = load_run(Path(q))
        m[f"quant {Path(q).name}"] = ("open", lambda ids, qrun=qrun: decode_row(qrun.model, ids, args.new))
    if not args.no_hf:
        try:
            hf_big, hf_small = (hf_model(run, args.dir / "hf" / name) for run, name in ((big, "big"), (small, "small")))
        except ImportError:
            log("transformers is not installed: no hf rows")
        else:
            m["hf plain"] = ("open", lambda ids: hf_row(hf_big, ids, args.new))
            m["hf assisted"] = ("open", lambda ids: hf_row(hf_big, ids, args.new, assistant_model=hf_small))
            m["hf lookup (grounded)"] = ("grounded", lambda ids: hf_row(hf_big, ids, args.new, prompt_lookup_num_tokens=max(args.draft_tokens)))
    return m


def hf_model(run, folder: Path):
    from transformers import AutoModelForCausalLM

    from worldloom.export.hf import export_hf

    if not folder.exists():
        export_hf(run, folder)
    return AutoModelForCausalLM.from_pretrained(folder, torch_dtype=torch.float32).eval()


def measure(big, small, args, log) -> list[dict]:
    text = DATA.read_text(encoding="utf-8") if not args.quick else args.corpus.read_text(encoding="utf-8")
    sets = {k: [big.tokenizer.encode(p).tolist() for p in v] for k, v in prompts(text, args.prompts, 64).items()}
    table = methods(big, small, args, log)
    times = {name: [] for name in table}
    outs: dict[str, list] = {}
    stats: dict[str, list] = {name: [] for name in table}
    for name, (which, fn) in table.items():  # warm-up (allocations, lazy inits)
        fn(sets[which][0])
    for rep in range(args.repeats):
        for name, (which, fn) in table.items():
            total, got = 0.0, []
            for ids in sets[which]:
                sec, toks, st = fn(ids)
                total += sec
                got.append(toks)
                if rep == 0 and st is not None:
                    stats[name].append(st)
            times[name].append(args.new * len(sets[which]) / total)
            outs[name] = got
        log(f"pass {rep + 1}/{args.repeats}: " + ", ".join(f"{n} {statistics.median(t):.1f}" for n, t in times.items()))
    rows = []
    base = {"open": statistics.median(times["plain"]), "grounded": statistics.median(times["plain (grounded)"])}
    for name, (which, _) in table.items():
        tps = statistics.median(times[name])
        st = stats[name]
        drafted, accepted = sum(s.drafted for s in st), sum(s.accepted for s in st)
        forwards, tokens = sum(s.forwards for s in st), sum(s.tokens for s in st)
        ver, emitted = sum(s.verifications for s in st), sum(s.emitted for s in st)
        same = outs[name] == outs["plain" if which == "open" else "plain (grounded)"]
        rows.append({"method": name, "prompts": which, "tokens_per_s": round(tps, 1), "ratio": round(tps / base[which], 2),
                     "acceptance": round(accepted / drafted, 3) if drafted else None,
                     "mean_accepted_length": round(emitted / ver, 2) if ver else None,
                     "tokens_per_target_pass": round(tokens / forwards, 2) if forwards else None,
                     "same_as_plain": same})
    return rows


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dir", type=Path, required=True, help="working folder (runs/big, runs/small, hf/, decode.json)")
    ap.add_argument("--quick", action="store_true", help="tiny models on a generated corpus (smoke test)")
    ap.add_argument("--prompts", type=int, default=8)
    ap.add_argument("--new", type=int, default=200, help="tokens generated per prompt")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--draft-tokens", type=lambda v: [int(x) for x in v.split(",")], default=[4],
                    help="most drafts per verification; a comma list gives one draft row each (e.g. 3,5)")
    ap.add_argument("--medusa", help="a run made by `worldloom tune medusa` from runs/big")
    ap.add_argument("--distilled", nargs="*", help="draft runs made by `worldloom tune draft` from runs/big")
    ap.add_argument("--quant", nargs="*", help="quantised runs of runs/big (`worldloom quantize`)")
    ap.add_argument("--no-hf", action="store_true", help="skip the transformers anchors")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0 = all cores)")
    args = ap.parse_args()
    args.dir.mkdir(parents=True, exist_ok=True)
    log = lambda s: print(s, file=sys.stderr, flush=True)  # noqa: E731
    data = DATA
    if args.quick:
        args.corpus = data = args.dir / "corpus.txt"
        if not data.exists():
            data.write_text(("First Citizen:\nBefore we proceed any further, hear me speak.\n\n" * 300), encoding="utf-8")
        args.prompts, args.new, args.repeats = min(args.prompts, 2), min(args.new, 30), 1
    big_dir = train(args.dir, "big" if not args.quick else "qbig", QUICK if args.quick else BIG, data, log)
    small_dir = train(args.dir, "small" if not args.quick else "qsmall", QUICK_SMALL if args.quick else SMALL, data, log)

    from worldloom.run import load_run
    from worldloom.runtime import set_threads

    set_threads(args.threads)
    big, small = load_run(big_dir), load_run(small_dir)
    rows = measure(big, small, args, log)
    n_big = sum(p.numel() for p in big.model.parameters())
    n_small = sum(p.numel() for p in small.model.parameters())
    result = {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="minutes"),
              "machine": f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads, torch {torch.__version__}",
              "command": " ".join(sys.argv), "target_params": n_big, "draft_params": n_small,
              "new_tokens": args.new, "prompts": args.prompts, "rows": rows}
    (args.dir / "decode.json").write_text(json.dumps(result, indent=1))
    print(f"target {n_big / 1e6:.1f}M parameters, draft {n_small / 1e6:.2f}M; batch 1, greedy, {args.new} new tokens x "
          f"{args.prompts} prompts, median of {args.repeats}\n")
    print("| method | prompts | tokens/s | × plain | drafts accepted | mean accepted length | tokens / target pass | same text as plain |")
    print("| --- | --- | ---: | ---: | ---: | ---: | ---: | --- |")
    for r in rows:
        acc = f"{100 * r['acceptance']:.0f}%" if r["acceptance"] is not None else "–"
        print(f"| {r['method']} | {r['prompts']} | {r['tokens_per_s']} | {r['ratio']} | {acc} | "
              f"{r['mean_accepted_length'] or '–'} | {r['tokens_per_target_pass'] or '–'} | {'yes' if r['same_as_plain'] else 'NO'} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
