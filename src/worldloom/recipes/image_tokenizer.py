"""The image-tokenizer recipe: a VQ-VAE or FSQ autoencoder on frames of a pixel environment.

    worldloom train tokenizer-vq                                  # BabyAI as pixels (rgb:BabyAI-GoToLocal-v0)
    worldloom train tokenizer-vq env.id=crafter vision.quantizer=fsq
    worldloom eval runs/tokenizer-vq                              # reconstruction, codebook use, MiniGrid cell accuracy

The task plays ``vision.frames`` training frames and ``vision.val_frames`` held-out frames (other
seeds) with random actions (``worldloom.vision.frames``), keeps them compressed in the run folder
(``frames/``), and trains the autoencoder through the one training loop: batches of frames, the
reconstruction MSE as the loss (pixels in [0, 1]) plus the commitment loss. Every evaluation
writes ``reconstructions.png`` (held-out frames above their reconstructions). The trained run is
an observation tokenizer: ``worldloom.vision.ImageTokenizer.from_run(RUN)``.
"""

from __future__ import annotations

import io
import json
import math
from pathlib import Path

import numpy as np
import torch

from ..config import RunConfig
from ..errors import ConfigError
from ..io import atomic_write_bytes, write_json
from ..losses import image_objective
from ..runtime import autocast
from ..vision.frames import VAL_SEEDS, collect_frames, load_frames, save_frames
from ..vision.tokenizer import META, tokenizer_meta
from ..world.envs.pixels import PIXELS
from . import Recipe, load_nothing, prepare_then_train, resume_training

FRAMES = "frames"
RECON = "reconstructions.png"


class ImageTokenizerTask:
    objective = staticmethod(image_objective)

    def __init__(self, cfg: RunConfig, run_dir: Path, resuming: bool):
        self.cfg, self.run_dir = cfg, Path(run_dir)
        self.data = frames_of(cfg, self.run_dir, progress=False)
        self.pixels = {k: torch.from_numpy(v[PIXELS]) for k, v in self.data.items()}
        h, w = self.frame_shape[:2]
        if h % cfg.vision.downsample or w % cfg.vision.downsample:
            raise ConfigError(f"{cfg.env.id} frames are {h}x{w}, not divisible by vision.downsample={cfg.vision.downsample}")

    @property
    def frame_shape(self) -> tuple[int, ...]:
        return tuple(self.data["train"][PIXELS].shape[1:])

    def model_sizes(self) -> dict:
        return {}

    def count(self, batch: dict) -> int:
        """Image tokens in a batch (what the loop's tokens/s counts): codes per frame x frames."""
        h, w = self.frame_shape[:2]
        return len(batch["input"]) * (h // self.cfg.vision.downsample) * (w // self.cfg.vision.downsample)

    def batch(self, batch_size: int, gen: torch.Generator) -> dict:
        idx = torch.randint(len(self.pixels["train"]), (batch_size,), generator=gen)
        return {"input": self.pixels["train"][idx]}

    @torch.no_grad()
    def val_loss(self, model, precision: str, device) -> float:
        """Reconstruction MSE over every held-out frame (the same frames every call); writes reconstructions.png."""
        was = model.training
        model.eval()
        total = 0.0
        pixels = self.pixels["val"]
        for i in range(0, len(pixels), 256):
            with autocast(precision, device):
                out = model(pixels[i:i + 256].to(device))
            total += float(((out.recon.float() - out.target.float()) ** 2).mean((1, 2, 3)).sum())
        if self.run_dir.is_dir():  # 8 held-out frames spread over the set (different worlds), and their reconstructions
            out = model(pixels[torch.linspace(0, len(pixels) - 1, 8).long()].to(device))
            write_png(self.run_dir / RECON, reconstruction_sheet(out.target, out.recon))
        model.train(was)
        return total / len(pixels)

    def save(self, run_dir: Path) -> None:
        for split, frames in self.data.items():
            if not (Path(run_dir) / FRAMES / f"{split}.npz").is_file():
                save_frames(Path(run_dir) / FRAMES / f"{split}.npz", frames)
        write_json(Path(run_dir) / META, tokenizer_meta(self.cfg.vision, self.frame_shape, self.cfg.env.id))

    def describe(self) -> str:
        vc, (h, w) = self.cfg.vision, self.frame_shape[:2]
        codes = vc.codebook if vc.quantizer == "vq" else math.prod(vc.levels())
        return (f"{len(self.pixels['train']):,} frames of {self.cfg.env.id} ({h}x{w}), {len(self.pixels['val']):,} held-out; "
                f"{vc.quantizer} with {codes} codes, {h // vc.downsample}x{w // vc.downsample} codes per frame")


def frames_of(cfg: RunConfig, run_dir: Path, progress: bool) -> dict[str, dict[str, np.ndarray]]:
    """The run's training and held-out frames: read from its frames/ folder (a resumed run trains on the
    frames it started with), or played now (held-out frames from other seeds)."""
    out = {}
    for split, n in (("train", cfg.vision.frames), ("val", cfg.vision.val_frames)):
        path = Path(run_dir) / FRAMES / f"{split}.npz"
        if path.is_file():
            out[split] = load_frames(path)
        else:
            seed = cfg.data.seed + (VAL_SEEDS if split == "val" else 0)
            out[split] = collect_frames(cfg.env.id, n, seed, progress, desc=f"frames ({split})")
    return out


def reconstruction_sheet(target: torch.Tensor, recon: torch.Tensor, scale: int = 2) -> np.ndarray:
    """(N, 3, H, W) pairs in [0, 1] -> one picture: originals on the top row, reconstructions below."""
    rows = [torch.cat(list(t.float().clamp(0, 1)), dim=2) for t in (target, recon)]  # (3, H, N*W) each
    sheet = (torch.cat(rows, dim=1) * 255).round().to(torch.uint8).permute(1, 2, 0).numpy()
    return sheet.repeat(scale, 0).repeat(scale, 1)


def write_png(path: Path, image: np.ndarray) -> None:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(image).save(buf, format="PNG")
    atomic_write_bytes(Path(path), buf.getvalue())


def build_model(cfg: RunConfig):
    from ..vision.autoencoder import ImageAutoencoder

    return ImageAutoencoder(cfg.vision)


def run(cfg: RunConfig, progress: bool = True, log=print) -> dict:
    """Play the frames (with a progress bar; kept in the run folder), then train."""
    return prepare_then_train(cfg, frames_of, save_frames, FRAMES, progress, log)


def evaluate(args, run) -> int:
    """`worldloom eval RUN` of a tokenizer: held-out reconstruction (MSE, PSNR), codebook use, and for
    MiniGrid RGB frames the share of cells read right from the reconstructions."""
    from ..vision.evaluate import evaluate_tokenizer

    res = evaluate_tokenizer(run, Path(args.run))
    if args.json:
        print(json.dumps(res, indent=2))
        return 0
    print(f"{args.run} (step {res['step']}), {res['frames']:,} held-out frames of {res['env_id']}: "
          f"MSE {res['mse']:.5f}, PSNR {res['psnr_db']:.2f} dB")
    print(f"  codes: {res['codes_used']:,} of {res['codebook']:,} used, perplexity {res['perplexity']:.1f}, "
          f"{res['tokens_per_frame']} per frame")
    if "cell_accuracy" in res:
        c = res["cell_accuracy"]
        print(f"  MiniGrid cells read right from the reconstructions: {c['cells']:.2%} (object cells "
              f"{c['object_cells']:.2%}, whole frames {c['frames_exact']:.2%}); from the real frames: "
              f"{res['cell_accuracy_real']['cells']:.2%}")
    return 0


RECIPE = Recipe("image-tokenizer", "an image tokenizer (VQ-VAE or FSQ) on frames of a pixel environment",
                ImageTokenizerTask, run, resume_training, load_nothing, evaluate, model_fields=(), build_model=build_model)
