"""A trained mel autoencoder as a tokenizer: speech <-> code tokens, one per ``audio.stack`` mel frames.

``AudioTokenizer`` implements the observation-tokenizer protocol (``worldloom.tokenize.base``) over
the field ``mel`` and registers itself as kind ``"audio"``: a clip of ``clip`` log-mel frames
(N, clip, M) becomes clip / stack tokens, each an id in [0, codebook). Utterances have their own
lengths, so beside the batch forms it has ``encode(mel)`` (one utterance, any length: padded with
silence to a multiple of stack) and ``decode(ids)`` (log-mel frames back), and ``wave(ids)``:
decoded through Griffin-Lim (``mel.MelSpec``) to samples at ``audio.sample_rate``.

``AudioTokenizer.from_run(RUN)`` takes an `worldloom train tokenizer-audio` run's weights;
``save``/``load`` write and read its own two files (JSON + safetensors) into a folder.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from ..errors import CheckpointError
from ..tokenize.base import register_obs_tokenizer
from ..tokenize.learned import load_learned, save_learned
from .mel import MelSpec
from .utterances import pad_frames

MEL = "mel"
META = "audio_tokenizer.json"
WEIGHTS = "audio_tokenizer.safetensors"


def build_autoencoder(audio: dict):
    from ..config import AudioConfig, from_dict
    from .autoencoder import MelAutoencoder

    return MelAutoencoder(from_dict(AudioConfig, audio, "audio."))


@register_obs_tokenizer
class AudioTokenizer:
    kind = "audio"
    modality = "audio"
    fields = (MEL,)

    def __init__(self, model, clip: int | None = None):
        self.model = model.eval()
        self.cfg = model.cfg
        self.clip = int(clip or self.cfg.crop)
        self.spec = MelSpec(self.cfg)

    @property
    def n_tokens(self) -> int:
        return self.clip // self.cfg.stack

    @property
    def vocab_size(self) -> int:
        return self.model.codebook_size

    def token_ranges(self) -> list[tuple[int, int]]:
        return [(0, self.vocab_size)] * self.n_tokens

    def encode_batch(self, fields: dict[str, np.ndarray], chunk: int = 256) -> np.ndarray:
        mel = np.asarray(fields[MEL], np.float32)
        if mel.ndim != 3 or mel.shape[1:] != (self.clip, self.cfg.n_mels):
            raise ValueError(f"this audio tokenizer reads (N, {self.clip}, {self.cfg.n_mels}) log-mel clips, got {mel.shape}")
        out = [self.model.encode(torch.from_numpy(mel[i:i + chunk])) for i in range(0, len(mel), chunk)]
        return torch.cat(out).numpy().astype(np.int64) if out else np.zeros((0, self.n_tokens), np.int64)

    def decode_batch(self, ids: np.ndarray) -> dict[str, np.ndarray]:
        ids = torch.as_tensor(np.asarray(ids, np.int64)).clamp(0, self.vocab_size - 1).reshape(-1, self.n_tokens)
        return {MEL: self.model.decode(ids).numpy()}

    def encode(self, mel: np.ndarray) -> np.ndarray:
        """One utterance's (T, M) log-mel frames -> (ceil(T / stack),) ids."""
        mel = pad_frames(np.asarray(mel, np.float32), self.cfg.stack)
        return self.model.encode(torch.from_numpy(mel)[None])[0].numpy().astype(np.int64)

    def decode(self, ids: np.ndarray) -> np.ndarray:
        """(t,) ids -> (t * stack, M) log-mel frames."""
        ids = torch.as_tensor(np.asarray(ids, np.int64)).clamp(0, self.vocab_size - 1)
        return self.model.decode(ids[None])[0].numpy()

    def wave(self, ids: np.ndarray) -> np.ndarray:
        """(t,) ids -> float32 samples (Griffin-Lim of the decoded frames)."""
        return self.spec.griffin_lim(self.decode(ids))

    def meta(self) -> dict:
        from ..config import to_dict

        return {"kind": self.kind, "audio": to_dict(self.cfg), "clip": self.clip}

    def save(self, folder: Path) -> None:
        save_learned(folder, self.model, self.meta(), META, WEIGHTS)

    @classmethod
    def load(cls, folder: Path) -> "AudioTokenizer":
        model, meta = load_learned(folder, META, WEIGHTS, "audio tokenizer", lambda m: build_autoencoder(m["audio"]))
        return cls(model, meta.get("clip"))

    @classmethod
    def from_run(cls, run_dir: Path) -> "AudioTokenizer":
        """The tokenizer a `worldloom train tokenizer-audio` run folder holds (its latest checkpoint)."""
        from ..run import load_run, read_run_config

        cfg = read_run_config(run_dir)
        if cfg.recipe != "audio-tokenizer":
            raise CheckpointError(f"{run_dir} is a {cfg.recipe} run, not an audio tokenizer "
                                  "(train one with `worldloom train tokenizer-audio`)")
        return cls(load_run(run_dir, any_model=True).model)
