#!/usr/bin/env python
"""The most any model imagining from o_0 alone can score on the open-loop 'cells seen before' metric.

    python benchmarks/open_loop_bound.py runs/babyai/data            # the 200 longest validation episodes
    python benchmarks/open_loop_bound.py runs/babyai/data --episodes 100

The restated open-loop metric of issue 12 (``frame_seen``) scores the k-th imagined frame on every cell whose
place an earlier REAL observation o_0 .. o_{k-1} showed. Open-loop imagination is given o_0 alone: an object
that only real o_1 .. o_{k-1} revealed was never shown to the model, and the level generator places objects at
random. So a frame can be exact on its counted cells only if none of them holds an object (anything but empty,
wall, floor, unseen) at a place o_0 did not show. This prints, per horizon, how many frames satisfy that: the
bound on ``frame_seen`` for any model short of guessing the generator's placements. The episodes are the ones
the world evaluation picks for open loop (the longest validation episodes, ``eval.open_loop`` of them).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from worldloom.errors import WorldloomError  # noqa: E402


def bound(data: Path, episodes: int, horizons=(1, 5, 10)) -> dict:
    from minigrid.core.constants import OBJECT_TO_IDX

    from worldloom.world.data.episodes import load_dataset
    from worldloom.world.envs import make_adapter
    from worldloom.world.rollout.imagine import open_loop_order

    ds = load_dataset(data)
    val = ds.episodes("val")
    eps = [val[i] for i in open_loop_order(val, episodes)]
    adapter = make_adapter(ds.meta["env_id"])
    seen, shown = adapter.seen_cells(eps), adapter.seen_cells(eps, shown=1)
    plain = {OBJECT_TO_IDX[k] for k in ("empty", "wall", "floor", "unseen")}
    out = {}
    for k in horizons:
        n = ok = 0
        for ep, s, h in zip(eps, seen, shown):
            if s is None or ep.length < k:
                continue
            n += 1
            revealed_later = ep.obs["image"][k][..., 0][s[k] & ~h[k]]  # counted cells whose place o_0 did not show
            ok += all(int(o) in plain for o in revealed_later)
        out[k] = (ok, n)
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("data", type=Path, help="a world data folder (a run's data/), with a val split")
    ap.add_argument("--episodes", type=int, default=200, help="the longest validation episodes scored (eval.open_loop)")
    args = ap.parse_args()
    try:
        res = bound(args.data, args.episodes)
    except (WorldloomError, OSError, KeyError) as e:
        print(f"open_loop_bound: {e}", file=sys.stderr)
        return 2
    for k, (ok, n) in res.items():
        print(f"k={k:>2}: {ok}/{n} frames hold no object that only real o_1..o_{k - 1} revealed -> "
              f"frame_seen can be at most {ok / max(n, 1):.1%}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
