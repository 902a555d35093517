"""`worldloom eval` of an image-tokenizer run: what its codes keep of held-out frames."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch

from ..world.envs.pixels import PIXELS
from .frames import load_frames
from .quantizers import perplexity


def round_trip(model, pixels: np.ndarray, chunk: int = 256) -> tuple[np.ndarray, np.ndarray]:
    """Frames (N, H, W, 3) uint8 -> (codes (N, h, w), decoded frames (N, H, W, 3) uint8): the tokenizer's two ways."""
    codes, frames = [], []
    for i in range(0, len(pixels), chunk):
        c = model.encode(torch.from_numpy(pixels[i:i + chunk]))
        codes.append(c)
        frames.append(model.decode(c))
    return torch.cat(codes).numpy(), torch.cat(frames).numpy()


def evaluate_tokenizer(run, run_dir: Path) -> dict:
    from ..recipes.image_tokenizer import FRAMES

    val = load_frames(Path(run_dir) / FRAMES / "val.npz")
    codes, recon = round_trip(run.model.eval(), val[PIXELS])
    mse = float(((recon.astype(np.float64) - val[PIXELS]) / 255.0).__pow__(2).mean())
    k = run.model.codebook_size
    res = {"run": str(run_dir), "step": run.state["step"], "env_id": run.cfg.env.id, "frames": len(codes),
           "mse": mse, "psnr_db": 10 * math.log10(1.0 / max(mse, 1e-12)), "codebook": k,
           "codes_used": len(np.unique(codes)), "perplexity": perplexity(torch.from_numpy(codes.reshape(-1)), k),
           "tokens_per_frame": int(codes[0].size)}
    if "image" in val:  # MiniGrid RGB: the symbolic views are stored beside the pixels
        from .cells import CellReader

        reader = CellReader(load_frames(Path(run_dir) / FRAMES / "train.npz"))
        res["cell_accuracy"] = reader.accuracy(recon, val["image"])
        res["cell_accuracy_real"] = reader.accuracy(val[PIXELS], val["image"])  # the reader's own ceiling
    return res
