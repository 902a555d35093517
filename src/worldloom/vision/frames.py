"""Frames for an image tokenizer: played in an environment, stored compressed in the run folder.

``collect_frames(env_id, n, seed, log)`` plays episodes with uniformly random actions (one
``numpy`` generator per episode, seeded by ``[seed, episode]``) and keeps every observation,
episode after episode, until it holds ``n`` frames; an episode is cut after ``EPISODE_CAP``
steps so that many worlds are seen. The training frames use seeds ``seed + i``, the held-out
frames ``seed + 1_000_000 + i``: no world is in both. Besides ``pixels`` (N, H, W, 3) uint8 it
keeps the other stored fields of the adapter (e.g. MiniGrid's symbolic ``image``, which the
cell checker compares with).

``save_frames`` / ``load_frames`` write and read one ``.npz`` (compressed; plain arrays, read with
``allow_pickle=False``), through a temporary file renamed into place.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from tqdm.auto import tqdm

from ..errors import CheckpointError
from ..io import atomic_write_bytes
from ..world.envs import make_adapter
from ..world.envs.pixels import PIXELS

EPISODE_CAP = 100
VAL_SEEDS = 1_000_000


def collect_frames(env_id: str, n: int, seed: int, progress: bool = False, desc: str = "frames") -> dict[str, np.ndarray]:
    adapter = make_adapter(env_id)
    if PIXELS not in adapter.obs_fields:
        raise CheckpointError(f"{env_id} has no pixel observations; an image tokenizer needs one of: rgb:<MiniGrid id>, "
                              "crafter, ALE/<game>-v5")
    env = adapter.make()
    out: dict[str, list] = {k: [] for k in adapter.obs_fields}
    got, episode = 0, 0
    with tqdm(total=n, desc=desc, unit="frame", disable=not progress, dynamic_ncols=True, leave=False) as bar:
        while got < n:
            rng = np.random.default_rng([seed, episode])
            obs, _ = env.reset(seed=seed + episode)
            for step in range(EPISODE_CAP):
                for k, v in adapter.observe(obs).items():
                    out[k].append(v)
                got += 1
                bar.update(1)
                if got >= n:
                    break
                obs, _, term, trunc, _ = env.step(int(rng.integers(adapter.n_actions)))
                if term or trunc:
                    break
            episode += 1
    env.close()
    return {k: np.stack(v) for k, v in out.items()}


def save_frames(path: Path, frames: dict[str, np.ndarray]) -> None:
    import io

    buf = io.BytesIO()
    np.savez_compressed(buf, **frames)
    atomic_write_bytes(Path(path), buf.getvalue())


def load_frames(path: Path) -> dict[str, np.ndarray]:
    try:
        with np.load(Path(path), allow_pickle=False) as z:
            frames = {k: z[k] for k in z.files}
    except (OSError, ValueError, EOFError) as e:
        raise CheckpointError(f"{path} is not a readable frames file ({e}); delete it to collect the frames again") from None
    if PIXELS not in frames or frames[PIXELS].ndim != 4 or frames[PIXELS].dtype != np.uint8:
        raise CheckpointError(f"{path} holds no (N, H, W, 3) uint8 '{PIXELS}' array; delete it to collect the frames again")
    return frames
