"""The on-disk episode schema (version 1): ``Episode`` records, npz shards and dataset folders.

An episode of T actions holds T+1 observations o_0..o_T (the last one is the observation after
the last action), T actions, T rewards, T ``random_action`` flags and, optionally, T expert
``label`` actions (what the expert would have done where someone else acted: on-policy data). A shard is one compressed
npz holding many episodes concatenated along the time axis, with per-episode offsets; every
array is numeric or fixed-width unicode, so shards are read with ``allow_pickle=False``.

A dataset folder::

    <dir>/meta.json                 written last: a folder with meta.json is complete
    <dir>/train/shard-00000.npz ...
    <dir>/val/shard-00000.npz ...

The fields, dtypes and meta.json keys are documented in ``docs/episodes.md``.
"""

from __future__ import annotations

import io
import json
import zipfile
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ...errors import DataError
from ...io import atomic_write_bytes

SCHEMA_VERSION = 1
SPLITS = ("train", "val")
META_FILE = "meta.json"

# Per-episode arrays of a shard (length E), besides the offsets (length E+1).
_EPISODE_KEYS = ("seed", "mission", "terminated", "truncated", "epsilon")
# Per-step arrays of a shard (length sum(T)).
_STEP_KEYS = ("action", "reward", "random_action")
# numpy dtype kinds each array may have (b bool, i/u integer, f float, U unicode).
_KINDS = {
    "label": "i", "schema": "iu", "obs_offset": "iu", "step_offset": "iu", "seed": "iu", "mission": "U",
    "terminated": "b", "truncated": "b", "epsilon": "f", "action": "iu", "reward": "f", "random_action": "b",
}


@dataclass(eq=False, repr=False)
class Episode:
    """One episode: T actions between T+1 observations.

    ``terminated`` / ``truncated`` say how the last step ended the episode (both False if it was
    cut for another reason). ``random_action[t]`` is True where action t was drawn at random
    instead of taken from the expert; ``epsilon`` is the per-step probability of that draw in
    this episode (0.0 = a pure expert episode). ``epsilon`` is rounded to float32, as stored. ``label`` (optional) holds the expert's
    action at each step where another policy acted (-1 where the expert gave none); an episode
    with labels is learned from its labels, not from its actions.
    """

    seed: int
    mission: str
    obs: dict[str, np.ndarray]  # field -> (T+1, *shape)
    action: np.ndarray  # (T,) int64
    reward: np.ndarray  # (T,) float32
    terminated: bool
    truncated: bool
    random_action: np.ndarray  # (T,) bool
    epsilon: float = 0.0
    label: np.ndarray | None = None  # (T,) int64: the expert's action at step t, -1 = none; None = no labels

    def __post_init__(self):
        self.seed = int(self.seed)
        self.mission = str(self.mission)
        self.action = np.asarray(self.action, dtype=np.int64)
        self.reward = np.asarray(self.reward, dtype=np.float32)
        self.random_action = np.asarray(self.random_action, dtype=bool)
        self.terminated = bool(self.terminated)
        self.truncated = bool(self.truncated)
        self.epsilon = float(np.float32(self.epsilon))
        if self.label is not None:
            self.label = np.asarray(self.label, dtype=np.int64)

    @property
    def policy_label(self) -> np.ndarray:
        """(T,) the action the policy should learn at each step, -1 where there is none: the
        ``label`` if the episode has labels, else the action taken where it was not random."""
        if self.label is not None:
            return self.label
        return np.where(self.random_action, -1, self.action)

    @property
    def length(self) -> int:
        """T, the number of actions."""
        return len(self.action)

    @property
    def perturbed(self) -> bool:
        return self.epsilon > 0

    @property
    def success(self) -> bool:
        return self.terminated and self.length > 0 and float(self.reward[-1]) > 0

    def validate(self) -> None:
        """ValueError if the arrays disagree on T (a bug in whoever built the episode)."""
        T = self.length
        if self.action.shape != (T,) or self.reward.shape != (T,) or self.random_action.shape != (T,):
            raise ValueError(f"episode {self.seed}: action/reward/random_action must all have shape ({T},)")
        if self.label is not None and self.label.shape != (T,):
            raise ValueError(f"episode {self.seed}: label must have shape ({T},)")
        if not self.obs:
            raise ValueError(f"episode {self.seed}: no observation fields")
        for name, arr in self.obs.items():
            if len(arr) != T + 1:
                raise ValueError(f"episode {self.seed}: obs[{name!r}] has {len(arr)} entries, expected T+1 = {T + 1}")

    def __eq__(self, other) -> bool:
        if not isinstance(other, Episode):
            return NotImplemented
        if (self.seed, self.mission, self.terminated, self.truncated, self.epsilon) != (
            other.seed, other.mission, other.terminated, other.truncated, other.epsilon
        ):
            return False
        if self.obs.keys() != other.obs.keys() or (self.label is None) != (other.label is None):
            return False
        pairs = [(self.obs[k], other.obs[k]) for k in self.obs]
        pairs += [(self.action, other.action), (self.reward, other.reward), (self.random_action, other.random_action)]
        if self.label is not None:
            pairs.append((self.label, other.label))
        return all(a.dtype == b.dtype and a.shape == b.shape and np.array_equal(a, b) for a, b in pairs)

    __hash__ = None

    def __repr__(self) -> str:
        fields = ", ".join(f"{k}{tuple(v.shape)}" for k, v in self.obs.items())
        return (
            f"Episode(seed={self.seed}, mission={self.mission!r}, length={self.length}, "
            f"success={self.success}, epsilon={self.epsilon:g}, obs=[{fields}])"
        )


# ----------------------------------------------------------------------------------- shards


def write_shard(path: str | Path, episodes: list[Episode]) -> None:
    """Write episodes to one compressed npz, atomically (temp file in the same folder + rename)."""
    if not episodes:
        raise ValueError("write_shard needs at least one episode")
    fields = list(episodes[0].obs)
    for ep in episodes:
        ep.validate()
        if list(ep.obs) != fields:
            raise ValueError(f"episode {ep.seed} has observation fields {list(ep.obs)}, expected {fields}")
        if len(ep.action) and (ep.action.min() < 0 or ep.action.max() > 255):
            raise ValueError(f"episode {ep.seed}: actions must be in 0..255 to be stored as uint8")
        if ep.label is not None and len(ep.label) and (ep.label.min() < -1 or ep.label.max() > 255):
            raise ValueError(f"episode {ep.seed}: labels must be in -1..255")
    lengths = np.array([ep.length for ep in episodes], dtype=np.int64)
    arrays = {f"obs_{k}": np.concatenate([ep.obs[k] for ep in episodes]) for k in fields}
    arrays.update(
        action=np.concatenate([ep.action for ep in episodes]).astype(np.uint8),
        reward=np.concatenate([ep.reward for ep in episodes]).astype(np.float32),
        random_action=np.concatenate([ep.random_action for ep in episodes]).astype(bool),
        obs_offset=np.concatenate([[0], np.cumsum(lengths + 1)]).astype(np.int64),
        step_offset=np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64),
        seed=np.array([ep.seed for ep in episodes], dtype=np.int64),
        mission=np.array([ep.mission for ep in episodes], dtype=np.str_),  # fixed-width <U..
        terminated=np.array([ep.terminated for ep in episodes], dtype=bool),
        truncated=np.array([ep.truncated for ep in episodes], dtype=bool),
        epsilon=np.array([ep.epsilon for ep in episodes], dtype=np.float32),
        schema=np.array(SCHEMA_VERSION, dtype=np.int64),
    )
    if any(ep.label is not None for ep in episodes):  # optional key: the policy labels of every episode
        arrays["label"] = np.concatenate([ep.policy_label for ep in episodes]).astype(np.int16)
    buf = io.BytesIO()
    np.savez_compressed(buf, **arrays)
    atomic_write_bytes(Path(path), buf.getvalue())


class _Corrupt(Exception):
    """A short reason why a shard cannot be read."""


def _load_npz(path: Path) -> dict[str, np.ndarray]:
    """Every array of an npz file, without unpickling; _Corrupt with a short reason otherwise."""
    stage = "open"
    try:
        z = np.load(path, allow_pickle=False)
        if not isinstance(z, np.lib.npyio.NpzFile):
            raise _Corrupt("an .npy array, not an npz archive")
        stage = "read"
        with z:
            return {k: z[k] for k in z.files}
    except (zipfile.BadZipFile, zlib.error, EOFError, OSError) as e:
        raise _Corrupt(f"{type(e).__name__}: {str(e)[:80]}") from None
    except ValueError as e:
        if "pickle" in str(e):  # numpy refuses object arrays, and bytes that are neither npz nor npy
            raise _Corrupt("not an npz archive" if stage == "open" else "holds pickled object arrays") from None
        raise _Corrupt(f"ValueError: {str(e)[:80]}") from None


def _check_offsets(name: str, offsets: np.ndarray, n_episodes: int, total: int) -> None:
    if offsets.shape != (n_episodes + 1,):
        raise _Corrupt(f"{name} has shape {offsets.shape}, expected ({n_episodes + 1},)")
    if offsets[0] != 0 or offsets[-1] != total or np.any(np.diff(offsets) < 0):
        raise _Corrupt(f"{name} is inconsistent with the data")


def _episodes_from_arrays(data: dict[str, np.ndarray]) -> list[Episode]:
    missing = [k for k in ("schema", "obs_offset", "step_offset", *_EPISODE_KEYS, *_STEP_KEYS) if k not in data]
    fields = [k[len("obs_"):] for k in data if k.startswith("obs_") and k not in ("obs_offset",)]
    if missing or not fields:
        raise _Corrupt(f"missing {', '.join(missing) or 'observation fields'}")
    for k, kinds in {**_KINDS, **{f"obs_{f}": "biuf" for f in fields}}.items():
        if k == "label" and k not in data:  # optional
            continue
        if data[k].dtype.kind not in kinds:
            raise _Corrupt(f"{k} has dtype {data[k].dtype}")
        if k != "schema" and data[k].ndim == 0:
            raise _Corrupt(f"{k} is a scalar")
    if data["schema"].shape != () or int(data["schema"]) != SCHEMA_VERSION:
        raise _Corrupt(f"schema {data['schema']!s}, this worldloom reads schema {SCHEMA_VERSION}")
    E = len(data["seed"])
    for k in _EPISODE_KEYS:
        if data[k].shape != (E,):
            raise _Corrupt(f"{k} has shape {data[k].shape}, expected ({E},)")
    steps = len(data["action"])
    for k in (*_STEP_KEYS, "label"):
        if k in data and data[k].shape != (steps,):
            raise _Corrupt(f"{k} has shape {data[k].shape}, expected ({steps},)")
    n_obs = len(data[f"obs_{fields[0]}"])
    if any(len(data[f"obs_{k}"]) != n_obs for k in fields):
        raise _Corrupt("observation fields have different lengths")
    obs_off, step_off = data["obs_offset"], data["step_offset"]
    _check_offsets("obs_offset", obs_off, E, n_obs)
    _check_offsets("step_offset", step_off, E, steps)
    if not np.array_equal(np.diff(obs_off), np.diff(step_off) + 1):
        raise _Corrupt("obs_offset and step_offset disagree")

    action = data["action"].astype(np.int64)
    label = data["label"].astype(np.int64) if "label" in data else None
    episodes = []
    for e in range(E):
        o0, o1, s0, s1 = obs_off[e], obs_off[e + 1], step_off[e], step_off[e + 1]
        episodes.append(
            Episode(
                seed=int(data["seed"][e]),
                mission=str(data["mission"][e]),
                obs={k: data[f"obs_{k}"][o0:o1] for k in fields},
                action=action[s0:s1],
                reward=data["reward"][s0:s1],
                terminated=bool(data["terminated"][e]),
                truncated=bool(data["truncated"][e]),
                random_action=data["random_action"][s0:s1],
                epsilon=float(data["epsilon"][e]),
                label=None if label is None else label[s0:s1],
            )
        )
    return episodes


def read_shard(path: str | Path) -> list[Episode]:
    """The episodes of one shard; DataError if it is missing or corrupt."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"episode shard not found: {path}")
    try:
        return _episodes_from_arrays(_load_npz(path))
    except _Corrupt as e:
        raise DataError(f"episode shard {path} is corrupt ({e}); collect the data again") from None


# --------------------------------------------------------------------------------- datasets


def shard_name(split: str, index: int) -> str:
    """The path of a shard relative to the dataset folder, e.g. ``train/shard-00000.npz``."""
    return f"{split}/shard-{index:05d}.npz"


def obs_fields_from_meta(meta: dict) -> dict[str, tuple[tuple[int, ...], np.dtype]]:
    """meta.json's ``obs_fields`` back as name -> (shape, dtype)."""
    return {k: (tuple(v["shape"]), np.dtype(v["dtype"])) for k, v in meta["obs_fields"].items()}


class EpisodeDataset:
    """A collected dataset folder: ``meta`` (the parsed meta.json) and ``episodes(split)``."""

    def __init__(self, root: Path, meta: dict):
        self.root = Path(root)
        self.meta = meta

    @property
    def splits(self) -> list[str]:
        return list(self.meta["splits"])

    def shard_paths(self, split: str) -> list[Path]:
        if split not in self.meta["splits"]:
            raise DataError(f"no split {split!r} in episode dataset {self.root}; splits: {', '.join(self.splits)}")
        return [self.root / rel for rel in self.meta["splits"][split]["shards"]]

    def episodes(self, split: str) -> list[Episode]:
        """All episodes of a split, in seed order (reads every shard of the split)."""
        out: list[Episode] = []
        for p in self.shard_paths(split):
            out.extend(read_shard(p))
        return out

    def __repr__(self) -> str:
        sizes = ", ".join(f"{s}={self.meta['splits'][s]['episodes']}" for s in self.splits)
        return f"EpisodeDataset({str(self.root)!r}, {self.meta.get('env_id')}, {sizes})"


def load_dataset(root: str | Path) -> EpisodeDataset:
    """Open a dataset folder written by ``worldloom collect``; DataError if it is incomplete."""
    root = Path(root)
    meta_path = root / META_FILE
    if not meta_path.is_file():
        raise DataError(f"no episode dataset in {root} (missing {META_FILE}); run `worldloom collect` first")

    def corrupt(reason: str) -> DataError:
        return DataError(f"{meta_path} is corrupt ({reason}); collect the data again")

    try:
        meta = json.loads(meta_path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise corrupt(f"{type(e).__name__}: {str(e).splitlines()[0][:80]}") from None
    if not isinstance(meta, dict):
        raise corrupt("not a JSON object")
    if meta.get("schema") != SCHEMA_VERSION:
        raise DataError(
            f"episode dataset {root} has schema {meta.get('schema')!r}; this worldloom reads schema "
            f"{SCHEMA_VERSION}; collect the data again"
        )
    splits = meta.get("splits")
    if not isinstance(splits, dict) or not all(isinstance(v, dict) and isinstance(v.get("shards"), list) for v in splits.values()):
        raise corrupt("no 'splits' with shard lists")
    if not isinstance(meta.get("obs_fields"), dict):
        raise corrupt("no 'obs_fields'")
    return EpisodeDataset(root, meta)
