"""Spoken missions as data: texts, the voices that spoke them and their log-mel frames, kept compressed.

``make_utterances(ac, n, seed, split)`` draws ``n`` missions of BabyAI-GoToLocal's grammar and a
voice for each from one generator seeded by ``[seed, SPLITS[split]]``, speaks them with espeak-ng
and keeps their log-mel frames, each padded with silence to a multiple of ``audio.stack``. The
splits: ``train`` and ``val`` (other draws, the same training voices) never use a voice of
``audio.held_out_voices``; ``voices`` uses only those (voices never heard in training).

The arrays (one ``.npz``, plain arrays read with ``allow_pickle=False``): ``mel`` (sum of T, M)
float16, every utterance's frames one after another; ``lengths`` (N,); ``text``, ``voice`` (N,)
strings; ``speed``, ``pitch`` (N,). ``frames(data, i)`` is utterance i's (T, M) block.
"""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
from tqdm.auto import tqdm

from ..errors import CheckpointError
from ..io import atomic_write_bytes
from .mel import SILENCE, MelSpec
from .speech import Voice, draw_voice, missions, speak

SPLITS = {"train": 0, "val": 1, "voices": 2}
KEYS = ("mel", "lengths", "text", "voice", "speed", "pitch")


def pad_frames(mel: np.ndarray, stack: int) -> np.ndarray:
    """(T, M) -> (T', M), T' the next multiple of ``stack``, padded with silent frames."""
    extra = -len(mel) % stack
    return np.concatenate([mel, np.full((extra, mel.shape[1]), SILENCE, mel.dtype)]) if extra else mel


def make_utterances(ac, n: int, seed: int, split: str, progress: bool = False, texts: list[str] | None = None) -> dict:
    """``n`` spoken missions (or the given ``texts``, cycled) of one split; see the module docstring."""
    rng = np.random.default_rng([seed, SPLITS[split]])
    spec, pool = MelSpec(ac), texts or missions()
    out: dict[str, list] = {k: [] for k in KEYS}
    for i in tqdm(range(n), desc=f"speech ({split})", unit="utt", disable=not progress, dynamic_ncols=True, leave=False):
        text = pool[int(rng.integers(len(pool)))] if texts is None else pool[i % len(pool)]
        voice = draw_voice(rng, ac.held_out(), held=split == "voices")
        mel = pad_frames(spec.logmel(speak(text, voice, ac.sample_rate)), ac.stack)
        for k, v in zip(KEYS, (mel, len(mel), text, voice.name, voice.speed, voice.pitch)):
            out[k].append(v)
    return {"mel": np.concatenate(out["mel"]).astype(np.float16), "lengths": np.array(out["lengths"], np.int64),
            "text": np.array(out["text"]), "voice": np.array(out["voice"]),
            "speed": np.array(out["speed"], np.int64), "pitch": np.array(out["pitch"], np.int64)}


def offsets(data: dict) -> np.ndarray:
    """(N + 1,) where each utterance's frames start in ``data["mel"]`` (and where the last ends)."""
    return np.concatenate([[0], np.cumsum(data["lengths"])])


def frames(data: dict, i: int) -> np.ndarray:
    """Utterance i's (T, M) float32 log-mel frames."""
    start = int(data["lengths"][:i].sum())
    return data["mel"][start:start + int(data["lengths"][i])].astype(np.float32)


def save_utterances(path: Path, data: dict) -> None:
    buf = io.BytesIO()
    np.savez_compressed(buf, **data)
    atomic_write_bytes(Path(path), buf.getvalue())


def load_utterances(path: Path) -> dict:
    try:
        with np.load(Path(path), allow_pickle=False) as z:
            data = {k: z[k] for k in z.files}
    except (OSError, ValueError, EOFError) as e:
        raise CheckpointError(f"{path} is not a readable utterances file ({e}); delete it to speak them again") from None
    if set(KEYS) - set(data) or data["mel"].ndim != 2 or int(data["lengths"].sum()) != len(data["mel"]):
        raise CheckpointError(f"{path} does not hold spoken utterances ({', '.join(KEYS)}); delete it to speak them again")
    return data


__all__ = ["Voice", "frames", "load_utterances", "make_utterances", "offsets", "pad_frames", "save_utterances"]
