#!/usr/bin/env python
"""Which MiniGrid cells an image-tokenizer run reads back wrong, by the true cell's object and colour.

    python benchmarks/tokenizer_misreads.py runs/tokenizer-vq [runs/other ...]

For each run folder (recipe image-tokenizer on an ``rgb:`` MiniGrid id): its held-out frames go
through the tokenizer and back, the cell checker (``worldloom.vision.cells.CellReader``, built from
the run's training frames) reads the reconstructions, and the misread cells are counted by the
true cell's MiniGrid object and colour index — the breakdown behind BENCHMARKS.md's
"Rare colours weigh more". The share read right is the same figure ``worldloom eval`` reports.
"""

from __future__ import annotations

import argparse
from collections import Counter
from pathlib import Path

from minigrid.core.constants import IDX_TO_COLOR, IDX_TO_OBJECT

from worldloom.recipes.image_tokenizer import FRAMES
from worldloom.run import load_run
from worldloom.vision.cells import CellReader, cell_labels
from worldloom.vision.evaluate import round_trip
from worldloom.vision.frames import load_frames
from worldloom.world.envs.pixels import PIXELS


def misreads(run_dir: Path, top: int) -> str:
    run = load_run(run_dir, any_model=True)
    val = load_frames(run_dir / FRAMES / "val.npz")
    _, recon = round_trip(run.model.eval(), val[PIXELS])
    truth = cell_labels(val["image"])
    wrong = truth != CellReader(load_frames(run_dir / FRAMES / "train.npz")).read(recon)
    obj, colour = (truth >> 16) & 255, (truth >> 8) & 255
    kinds = lambda mask: Counter(zip(obj[mask].tolist(), colour[mask].tolist()))  # noqa: E731
    total, bad = kinds(truth == truth), kinds(wrong)
    lines = [f"{run_dir}: {1 - wrong.mean():.2%} of {wrong.size:,} held-out cells read right ({int(wrong.sum())} misread)"]
    for (o, c), n in bad.most_common(top):
        lines.append(f"  {IDX_TO_COLOR.get(c, c)} {IDX_TO_OBJECT.get(o, o)}: {n} misread of {total[(o, c)]} ({n / total[(o, c)]:.1%})")
    agent = (truth >> 24) & 1 == 1
    lines.append(f"  the agent's own cell: {int(wrong[agent].sum())} misread of {int(agent.sum())}")
    return "\n".join(lines)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("runs", nargs="+", type=Path, help="image-tokenizer run folders (rgb: MiniGrid)")
    ap.add_argument("--top", type=int, default=10, help="how many object/colour kinds to list (most misread first)")
    a = ap.parse_args()
    for run_dir in a.runs:
        print(misreads(run_dir, a.top))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
