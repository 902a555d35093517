"""A trained image autoencoder as an observation tokenizer: a frame <-> a grid of code tokens.

``ImageTokenizer`` implements the observation-tokenizer protocol (``worldloom.tokenize.base``)
over the field ``pixels`` and registers itself as kind ``"image"``: a frame (H, W, 3) becomes
(H/f) x (W/f) tokens, read row by row like the cells of a MiniGrid view (``grid`` gives the
2-D shape for positions), each an id in [0, codebook). ``ImageTokenizer.from_run(RUN)`` takes
the weights of a tokenizer run (`worldloom train tokenizer-vq`); ``save``/``load`` write and
read its own two files (JSON + safetensors) into a folder, e.g. a world run's stream folder.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from ..errors import CheckpointError
from ..io import read_json
from ..tokenize.base import register_obs_tokenizer
from ..tokenize.learned import load_learned, save_learned
from ..world.envs.pixels import PIXELS

META = "image_tokenizer.json"
WEIGHTS = "image_tokenizer.safetensors"


def tokenizer_meta(vision, frame_shape, env_id: str) -> dict:
    """What META holds: the autoencoder's VisionConfig, the frame shape and the environment it was trained on."""
    from ..config import to_dict

    return {"kind": ImageTokenizer.kind, "vision": to_dict(vision), "frame_shape": [int(x) for x in frame_shape],
            "env_id": env_id}


def build_autoencoder(vision: dict):
    from ..config import VisionConfig, from_dict
    from .autoencoder import ImageAutoencoder

    return ImageAutoencoder(from_dict(VisionConfig, vision, "vision."))


@register_obs_tokenizer
class ImageTokenizer:
    kind = "image"
    modality = "image"
    fields = (PIXELS,)

    def __init__(self, model, frame_shape: tuple[int, int, int], env_id: str = ""):
        self.model = model.eval()
        self.frame_shape = tuple(int(x) for x in frame_shape)
        self.env_id = env_id
        f = model.cfg.downsample
        self.grid = (self.frame_shape[0] // f, self.frame_shape[1] // f)

    @property
    def n_tokens(self) -> int:
        return self.grid[0] * self.grid[1]

    @property
    def n_cells(self) -> int:
        """Every token is one cell of the code grid."""
        return self.n_tokens

    @property
    def view(self) -> int:
        """The side of a square code grid (what the stream's 2-D positions and frame encoder read), else 0."""
        return self.grid[0] if self.grid[0] == self.grid[1] else 0

    @property
    def vocab_size(self) -> int:
        return self.model.codebook_size

    def token_ranges(self) -> list[tuple[int, int]]:
        return [(0, self.vocab_size)] * self.n_tokens

    def _check(self, pixels: np.ndarray) -> np.ndarray:
        pixels = np.asarray(pixels)
        if pixels.ndim != 4 or tuple(pixels.shape[1:]) != self.frame_shape or pixels.dtype != np.uint8:
            raise ValueError(f"this image tokenizer reads (N, {', '.join(map(str, self.frame_shape))}) uint8 frames "
                             f"(trained on {self.env_id or 'such frames'}), got {pixels.shape} {pixels.dtype}")
        return pixels

    def encode_batch(self, fields: dict[str, np.ndarray], chunk: int = 256) -> np.ndarray:
        pixels = self._check(fields[PIXELS])
        out = [self.model.encode(torch.from_numpy(pixels[i:i + chunk])).reshape(-1, self.n_tokens)
               for i in range(0, len(pixels), chunk)]
        return torch.cat(out).numpy().astype(np.int64) if out else np.zeros((0, self.n_tokens), np.int64)

    def decode_batch(self, ids: np.ndarray, chunk: int = 256) -> dict[str, np.ndarray]:
        ids = torch.as_tensor(np.asarray(ids, np.int64)).clamp(0, self.vocab_size - 1).reshape(-1, *self.grid)
        out = [self.model.decode(ids[i:i + chunk]) for i in range(0, len(ids), chunk)]
        pixels = torch.cat(out).numpy() if out else np.zeros((0, *self.frame_shape), np.uint8)
        return {PIXELS: pixels}

    def meta(self) -> dict:
        return tokenizer_meta(self.model.cfg, self.frame_shape, self.env_id)

    def save(self, folder: Path) -> None:
        save_learned(folder, self.model, self.meta(), META, WEIGHTS)

    @classmethod
    def load(cls, folder: Path) -> "ImageTokenizer":
        model, meta = load_learned(folder, META, WEIGHTS, "image tokenizer", lambda m: build_autoencoder(m["vision"]))
        return cls(model, meta["frame_shape"], meta.get("env_id", ""))

    @classmethod
    def from_run(cls, run_dir: Path) -> "ImageTokenizer":
        """The tokenizer a `worldloom train tokenizer-vq` run folder holds (its latest checkpoint)."""
        from ..run import load_run, read_run_config

        cfg = read_run_config(run_dir)
        if cfg.recipe != "image-tokenizer":
            raise CheckpointError(f"{run_dir} is a {cfg.recipe} run, not an image tokenizer "
                                  "(train one with `worldloom train tokenizer-vq env.id=...`)")
        meta = read_json(Path(run_dir) / META, "image tokenizer")
        return cls(load_run(run_dir, any_model=True).model, meta["frame_shape"], cfg.env.id)

