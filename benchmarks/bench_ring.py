#!/usr/bin/env python
"""Ring attention memory (issue 11, item 9): peak memory per rank of ring attention against
full attention, forward + backward of one causal attention at 4k, 8k and 16k tokens.

Run::

    python benchmarks/bench_ring.py                        # 4k, 8k, 16k tokens; 4 gloo ranks (long)
    python benchmarks/bench_ring.py --ranks 2 --tokens 4096,8192
    python benchmarks/bench_ring.py --layout zigzag               # load-balanced split (same memory, even work)
    python benchmarks/bench_ring.py --quick                # 256 tokens, 2 ranks, tiny heads (smoke test, ~20 s)
    python benchmarks/bench_ring.py --out ring.json

The attention is one layer's: q, k, v of shape (B, H, T, D) (default B 1, H 6, D 64, the
heads of the shipped 384-wide presets), fp32, a random upstream gradient. Three cases per
length, each in fresh spawned processes (``worldloom.spawn.spawn_gloo``):

* ``full``: one process, ``F.scaled_dot_product_attention(q, k, v, is_causal=True)`` on the
  whole sequence, whatever kernel PyTorch picks (on CPU in fp32 that is its flash kernel,
  which never holds the (T, T) scores: its memory is already linear in T);
* ``ring1``: one process, ``ring_attention`` without a group (this module's blockwise kernel
  on the whole sequence: separates the kernel's memory from the effect of splitting);
* ``ringN``: N processes, each holding T/N tokens, ``ring_attention`` over the gloo group.

What is measured: each process creates only its own inputs (the ring ranks never build the
full sequence), runs a tiny warm-up (so lazy kernel and thread-pool set-up is not counted),
reads ``ru_maxrss`` (the kernel's record of the highest resident set so far), runs forward +
backward, and reads it again. The difference is the peak memory the attention added on top of
its inputs. ru_maxrss is a high-water mark, so the difference is exact only while nothing
freed before the baseline is re-used; that holds here because everything before it is small
(the warm-up) or still alive (the inputs). PyTorch's CPU allocator does not cache: large
tensors are mmapped and returned on free, so the resident peak tracks the peak of live
tensors (plus allocator slack of a few MiB; the printed figures are rounded to 0.1 MiB).
The inputs themselves (``inputs_mb``) are reported apart. Wall seconds of the forward +
backward are stored too, but on a shared 2-core machine the ring's N processes share the
cores, so they say nothing about speed.

``math_scores_mb`` is what attention without a fused kernel (SDPA's math path, or a GPU
without flash attention) would need for the fp32 (T, T) scores of every head alone:
B * H * T^2 * 4 bytes; ring attention divides it by N^2 per block and bounds it by a tile.
"""

from __future__ import annotations

import argparse
import datetime
import json
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent / "src"))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from bench_backbones import rss_mb  # noqa: E402
from worldloom.backbones.ring import check_split, ring_attention  # noqa: E402
from worldloom.io import write_json  # noqa: E402
from worldloom.spawn import spawn_gloo  # noqa: E402

MIB = 2**20


def log(msg: str = "") -> None:
    print(msg, flush=True)


def _attend(kind: str, layout: str, q, k, v):
    if kind == "full":
        rep = q.shape[1] // k.shape[1]
        return F.scaled_dot_product_attention(q, k.repeat_interleave(rep, 1), v.repeat_interleave(rep, 1), is_causal=True)
    return ring_attention(q, k, v, layout=layout)  # the default group: world 1 for ring1, N for ringN


def _inputs(shape: dict, t_local: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    B, H, KV, D = shape["batch"], shape["heads"], shape["kv_heads"], shape["head_dim"]
    q, k, v = (torch.randn(B, n, t_local, D, generator=g).requires_grad_() for n in (H, KV, KV))
    return q, k, v, torch.randn(B, H, t_local, D, generator=g)


def _case_worker(rank: int, world: int, kind: str, shape: dict, tokens: int, folder: str, layout: str) -> None:
    """One rank of one case: warm up, baseline, forward + backward, peak; writes its JSON."""
    q, k, v, up = _inputs(shape, 8, seed=rank)
    _attend(kind, layout, q, k, v).backward(up)  # warm-up: lazy kernel and thread-pool set-up
    q, k, v, up = _inputs(shape, tokens // world, seed=rank)
    inputs_mb = sum(t.numel() * t.element_size() for t in (q, k, v, up)) / MIB
    if world > 1:
        torch.distributed.barrier()
    before = rss_mb()
    start = time.perf_counter()
    _attend(kind, layout, q, k, v).backward(up)
    seconds = time.perf_counter() - start
    peak = rss_mb()
    write_json(Path(folder, f"{kind}-{tokens}-{rank}.json"),
               {"baseline_rss_mb": before, "peak_rss_mb": peak, "added_mb": round(peak - before, 1),
                "inputs_mb": round(inputs_mb, 1), "seconds": round(seconds, 3)})


def measure(kind: str, world: int, tokens: int, shape: dict, folder: Path, layout: str = "contiguous") -> dict:
    """Run one case (``world`` fresh processes) and summarise its ranks: the largest
    per-rank addition is the figure that decides whether the case fits a device."""
    check_split(tokens, world, layout)
    spawn_gloo(_case_worker, world, kind, shape, tokens, str(folder), layout, timeout_s=3600)
    ranks = [json.loads(Path(folder, f"{kind}-{tokens}-{r}.json").read_text()) for r in range(world)]
    return {"ranks": world, "per_rank": ranks,
            "added_mb_max": max(r["added_mb"] for r in ranks),
            "inputs_mb_per_rank": ranks[0]["inputs_mb"],
            "seconds_max": max(r["seconds"] for r in ranks)}


def run(tokens_list: list[int], ranks: int, shape: dict, folder: Path, layout: str = "contiguous") -> dict:
    """Every case at every length: {tokens: {"math_scores_mb", "full", "ring1", "ringN"}}."""
    results = {}
    for tokens in tokens_list:
        check_split(tokens, ranks, layout)
        row = {"math_scores_mb": round(shape["batch"] * shape["heads"] * tokens**2 * 4 / MIB, 1)}
        for kind, world in (("full", 1), ("ring1", 1), (f"ring{ranks}", ranks)):
            row[kind] = measure("full" if kind == "full" else "ring", world, tokens, shape, folder / kind, layout)
            log(f"  {tokens:>6} tokens  {kind:<6} peak added per rank {row[kind]['added_mb_max']:8.1f} MiB "
                f"(inputs {row[kind]['inputs_mb_per_rank']:.1f} MiB)")
        results[str(tokens)] = row
    return results


def table(res: dict) -> str:
    n = res["ranks"]
    lines = [f"| tokens | full attention (SDPA) | ring, 1 rank | ring, {n} ranks (per rank) "
             "| (T,T) scores, no fused kernel |",
             "| ---: | ---: | ---: | ---: | ---: |"]
    for tokens, row in res["results"].items():
        cells = [f"{row[k]['added_mb_max']:.1f} MiB" for k in ("full", "ring1", f"ring{n}")]
        lines.append(f"| {tokens} | " + " | ".join(cells) + f" | {row['math_scores_mb']:.0f} MiB |")
    return "\n".join(lines)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--tokens", default="4096,8192,16384")
    ap.add_argument("--ranks", type=int, default=4)
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--heads", type=int, default=6)
    ap.add_argument("--kv-heads", type=int, default=0, help="0: as many as --heads")
    ap.add_argument("--head-dim", type=int, default=64)
    ap.add_argument("--layout", default="contiguous", choices=("contiguous", "zigzag"), help="ring token layout")
    ap.add_argument("--quick", action="store_true", help="256 tokens, 2 ranks, 2 heads of 16: checks the script works")
    ap.add_argument("--out", type=Path, default=HERE / "results" / "ring.json")
    args = ap.parse_args(argv)
    if args.quick:
        args.tokens, args.ranks, args.heads, args.head_dim = "256", 2, 2, 16
    shape = {"batch": args.batch, "heads": args.heads, "kv_heads": args.kv_heads or args.heads, "head_dim": args.head_dim}
    tokens = [int(t) for t in args.tokens.split(",")]
    out = args.out
    from bench_foundation import machine_info

    res = {"date_utc": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
           "quick": args.quick, "machine": machine_info(), "shape": shape, "ranks": args.ranks, "tokens": tokens,
           "layout": args.layout}
    log(f"ring attention memory: B {shape['batch']}, H {shape['heads']} (kv {shape['kv_heads']}), D {shape['head_dim']}, "
        f"fp32, forward + backward; {args.ranks} gloo ranks, {args.layout} layout")
    with tempfile.TemporaryDirectory(prefix="bench_ring-") as work:  # the ranks' own JSON files
        res["results"] = run(tokens, args.ranks, shape, Path(work), args.layout)
    write_json(out, res)
    log("\npeak memory added by one attention forward + backward (ru_maxrss delta, per rank)\n" + table(res))
    log(f"\nwrote {out}")


if __name__ == "__main__":
    main()
