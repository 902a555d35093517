#!/usr/bin/env python
"""Pixel worlds: image-tokenizer throughput and imagination speed per world, in one run.

    python benchmarks/bench_pixels.py             # rgb:BabyAI-GoToLocal-v0, crafter, ALE/Pong-v5 (+ the symbolic view)
    python benchmarks/bench_pixels.py --quick     # tiny shapes, seconds (smoke test)

For every pixel world, with the presets' shapes and random weights (speed does not depend on what
the weights predict):

* tokenizer: frames encoded to codes and codes decoded to frames per second (`ImageTokenizer.
  encode_batch` / `decode_batch`, batch 64, the preset's autoencoder: tokenizer-vq's channels,
  downsample 8), on real frames of the world played at random;
* imagination: `BatchedWorldModelEnv.step` (token by token, greedy, uniformly random actions) of
  the world preset's model over that tokenizer's codes, batch 1 and 64; an imagined step includes
  decoding its frame to pixels. Imagined frames per second = B * steps / time (prefill not timed).

The symbolic BabyAI view (50 tokens, no decoder) is measured the same way as the peer.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
WORLDS = (("babyai (symbolic)", "babyai", "BabyAI-GoToLocal-v0"), ("babyai-rgb", "babyai-rgb", "rgb:BabyAI-GoToLocal-v0"),
          ("crafter", "crafter", "crafter"), ("atari (Pong)", "atari", "ALE/Pong-v5"))


def world_model(preset: str, env_id: str, frames: dict, quick: bool):
    """The preset's model (random weights) and a stream layout whose observation tokenizer is the preset's
    (a random-weight image tokenizer for pixel worlds)."""
    from worldloom.config import build_config
    from worldloom.model import LWM
    from worldloom.vision.tokenizer import ImageTokenizer, build_autoencoder
    from worldloom.world.envs import make_adapter
    from worldloom.world.envs.pixels import PIXELS
    from worldloom.world.stream import StreamLayout
    from worldloom.world.task import stream_model_sizes

    small = ["model.n_layer=1", "model.d_model=32", "model.n_head=2", "vision.channels=16"] if quick else []
    cfg = build_config(preset, [f"env.id={env_id}", *small])
    adapter = make_adapter(env_id)
    torch.manual_seed(0)
    if PIXELS in adapter.obs_fields:
        from worldloom.config import to_dict

        obs = ImageTokenizer(build_autoencoder(to_dict(cfg.vision)), frames[PIXELS].shape[1:], env_id)
    else:
        obs = adapter.obs_tokenizer()
    layout = StreamLayout.build(["go to the red ball"], adapter.n_actions, cfg.stream, obs)
    for k, v in stream_model_sizes(layout, cfg.stream).items():
        setattr(cfg.model, k, v)
    cfg.model.context = max(cfg.model.context, 4 * layout.step_len)
    return LWM(cfg.model).eval(), layout


def tokenizer_rate(tok, frames: np.ndarray, reps: int) -> tuple[float, float]:
    """(frames encoded per second, frames decoded per second) at batch len(frames)."""
    codes = tok.encode_batch({"pixels": frames})  # warm-up
    tok.decode_batch(codes)
    t = time.perf_counter()
    for _ in range(reps):
        codes = tok.encode_batch({"pixels": frames})
    enc = reps * len(frames) / (time.perf_counter() - t)
    t = time.perf_counter()
    for _ in range(reps):
        tok.decode_batch(codes)
    return enc, reps * len(frames) / (time.perf_counter() - t)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="tiny shapes, seconds (smoke test)")
    ap.add_argument("--steps", type=int, default=6, help="imagined steps per measurement")
    ap.add_argument("--worlds", default="", help="comma-separated subset of: " + ", ".join(w[1] for w in WORLDS))
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "pixels.json"))
    args = ap.parse_args(argv)
    torch.set_num_threads(2)

    from worldloom.vision.frames import collect_frames
    from worldloom.world.pipeline import write_bench_result
    from worldloom.world.rollout.imagine import imagination_throughput

    pick = {w.strip() for w in args.worlds.split(",") if w.strip()}
    batches = (1, 4) if args.quick else (1, 64)
    steps = 1 if args.quick else args.steps
    rows = []
    print(f"{'world':20} {'tokens/frame':>12} {'encode fr/s':>12} {'decode fr/s':>12} " + " ".join(f"{f'imagine B={b}':>14}" for b in batches))
    for name, preset, env_id in WORLDS:
        if pick and preset not in pick:
            continue
        frames = collect_frames(env_id, max(batches), seed=0) if env_id.startswith(("rgb:", "crafter", "ALE/")) else None
        if frames is None:  # the symbolic view: MiniGrid fields of random play
            frames = collect_frames("rgb:" + env_id, max(batches), seed=0)
            frames = {k: v for k, v in frames.items() if k != "pixels"}
        model, layout = world_model(preset, env_id, frames, args.quick)
        row = {"world": name, "env_id": env_id, "tokens_per_frame": layout.obs_len, "params": model.num_params()}
        if "pixels" in frames:
            enc, dec = tokenizer_rate(layout.obs, frames["pixels"], 1 if args.quick else 5)
            row.update(encode_frames_per_s=round(enc, 1), decode_frames_per_s=round(dec, 1))
        missions = ["go to the red ball"] * max(batches)
        for b in batches:
            imagination_throughput(model, layout, frames, missions, batch=b, steps=1, mode="tokens")  # warm-up
            row[f"imagine_b{b}"] = round(imagination_throughput(model, layout, frames, missions, batch=b, steps=steps,
                                                                mode="tokens"), 2)
        rows.append(row)
        print(f"{name:20} {layout.obs_len:>12} {row.get('encode_frames_per_s', float('nan')):>12.1f} "
              f"{row.get('decode_frames_per_s', float('nan')):>12.1f} " + " ".join(f"{row[f'imagine_b{b}']:>14.1f}" for b in batches),
              flush=True)
    write_bench_result(args.out, __file__, argv, worlds=rows, batches=list(batches), steps=steps)
    return 0


if __name__ == "__main__":
    sys.exit(main())
