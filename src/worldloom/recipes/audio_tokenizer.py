"""The audio-tokenizer recipe: a VQ autoencoder over log-mel frames of spoken BabyAI missions.

    worldloom train tokenizer-audio                         # ~2,000 missions spoken by espeak-ng, VQ over mel frames
    worldloom eval runs/tokenizer-audio                     # held-out reconstruction, codebook use; decoded wavs

The task speaks ``audio.utterances`` training missions, ``audio.val_utterances`` held-out ones in
training voices and as many in held-out voices (``worldloom.audio.utterances``), keeps their log-mel
frames compressed in the run folder (``speech/``) and trains ``MelAutoencoder`` through the one
training loop: batches of random clips of ``audio.crop`` frames, the reconstruction MSE (normalised
log-mel) plus the commitment loss. Every evaluation writes ``reconstructions/``: four held-out
utterances as wav files, Griffin-Lim of the true frames (``N-mel.wav``) beside Griffin-Lim of the
frames decoded from their codes (``N-codes.wav``). The trained run is an audio tokenizer:
``worldloom.audio.AudioTokenizer.from_run(RUN)``.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

from ..config import RunConfig
from ..io import atomic_write_bytes
from ..losses import image_objective
from ..runtime import autocast
from . import Recipe, load_nothing, prepare_then_train, resume_training

SPEECH = "speech"
RECON = "reconstructions"


def utterances_of(cfg: RunConfig, run_dir: Path, progress: bool) -> dict[str, dict]:
    """The run's utterances by split (train, val, voices): read from its speech/ folder, or spoken now."""
    from ..audio.utterances import load_utterances, make_utterances

    out = {}
    for split, n in (("train", cfg.audio.utterances), ("val", cfg.audio.val_utterances), ("voices", cfg.audio.val_utterances)):
        path = Path(run_dir) / SPEECH / f"{split}.npz"
        out[split] = load_utterances(path) if path.is_file() else make_utterances(cfg.audio, n, cfg.data.seed, split, progress)
    return out


class AudioTokenizerTask:
    objective = staticmethod(image_objective)

    def __init__(self, cfg: RunConfig, run_dir: Path, resuming: bool):
        from ..audio.utterances import offsets

        self.cfg, self.run_dir = cfg, Path(run_dir)
        self.data = utterances_of(cfg, self.run_dir, progress=False)
        train = self.data["train"]
        self.mel = torch.from_numpy(train["mel"].astype(np.float32))  # (sum T, M)
        self.starts = torch.from_numpy(offsets(train)[:-1])
        self.room = torch.from_numpy(np.maximum(train["lengths"] - cfg.audio.crop, 0) + 1)  # clip starts per utterance
        if (train["lengths"] < cfg.audio.crop).any():  # a clip may run into the next utterance, never past the end
            self.mel = torch.cat([self.mel, self.mel.new_full((cfg.audio.crop, self.mel.shape[1]), float(self.mel.min()))])

    def model_sizes(self) -> dict:
        return {}

    def count(self, batch: dict) -> int:
        """Audio tokens in a batch (what the loop's tokens/s counts)."""
        return batch["input"].shape[0] * batch["input"].shape[1] // self.cfg.audio.stack

    def batch(self, batch_size: int, gen: torch.Generator) -> dict:
        idx = torch.randint(len(self.starts), (batch_size,), generator=gen)
        start = self.starts[idx] + (torch.rand(batch_size, generator=gen) * self.room[idx]).long()
        rows = start[:, None] + torch.arange(self.cfg.audio.crop)  # (B, crop) frame indices
        return {"input": self.mel[rows]}

    @torch.no_grad()
    def val_loss(self, model, precision: str, device) -> float:
        """Reconstruction MSE (normalised log-mel) over every held-out utterance; writes reconstructions/."""
        from ..audio.utterances import frames

        was = model.training
        model.eval()
        val = self.data["val"]
        total = 0.0
        for i in range(len(val["lengths"])):
            with autocast(precision, device):
                out = model(torch.from_numpy(frames(val, i))[None].to(device))
            total += float(((out.recon.float() - out.target.float()) ** 2).mean())
        if self.run_dir.is_dir():
            write_reconstructions(model, val, self.run_dir / RECON)
        model.train(was)
        return total / len(val["lengths"])

    def save(self, run_dir: Path) -> None:
        from ..audio.utterances import save_utterances

        for split, data in self.data.items():
            if not (Path(run_dir) / SPEECH / f"{split}.npz").is_file():
                save_utterances(Path(run_dir) / SPEECH / f"{split}.npz", data)

    def describe(self) -> str:
        ac, n = self.cfg.audio, len(self.starts)
        seconds = float(self.data["train"]["lengths"].sum()) * ac.hop / ac.sample_rate
        return (f"{n:,} spoken missions ({seconds / 60:.1f} min of speech), {len(self.data['val']['lengths']):,} held-out "
                f"(+ as many in held-out voices {ac.held_out_voices}); {ac.n_mels} mels, VQ with {ac.codebook} codes, "
                f"one per {ac.stack} frames ({ac.sample_rate / ac.hop / ac.stack:.1f} tokens/s)")


def write_reconstructions(model, data: dict, folder: Path, n: int = 4) -> None:
    """Griffin-Lim wavs of ``n`` utterances: from their true log-mel frames and from their codes."""
    from ..audio.mel import MelSpec
    from ..audio.speech import wav_bytes
    from ..audio.utterances import frames

    spec = MelSpec(model.cfg)
    for k, i in enumerate(np.linspace(0, len(data["lengths"]) - 1, n).astype(int)):
        mel = frames(data, int(i))
        decoded = model.decode(model.encode(torch.from_numpy(mel)[None].to(next(model.parameters()).device)))[0].cpu()
        for tag, m in (("mel", mel), ("codes", decoded.numpy())):
            atomic_write_bytes(folder / f"{k}-{tag}.wav", wav_bytes(spec.griffin_lim(m), spec.rate))


def build_model(cfg: RunConfig):
    from ..audio.autoencoder import MelAutoencoder

    return MelAutoencoder(cfg.audio)


def run(cfg: RunConfig, progress: bool = True, log=print) -> dict:
    """Speak the utterances (with a progress bar; kept in the run folder), then train."""
    from ..audio.utterances import save_utterances

    return prepare_then_train(cfg, utterances_of, save_utterances, SPEECH, progress, log)


def evaluate(args, run) -> int:
    """`worldloom eval RUN` of an audio tokenizer: held-out reconstruction and codebook use, both held-out sets."""
    from ..audio.evaluate import evaluate_audio_tokenizer

    res = evaluate_audio_tokenizer(run, Path(args.run))
    if args.json:
        print(json.dumps(res, indent=2))
        return 0
    print(f"{args.run} (step {res['step']}): {res['tokens_per_second']:.1f} tokens per second of speech, "
          f"{res['codebook']} codes")
    for name in ("val", "voices"):
        r = res[name]
        print(f"  {name}: {r['utterances']} utterances, MSE {r['mse']:.4f} (normalised log-mel; "
              f"mean-frame baseline {r['baseline_mse']:.4f}), codes used {r['codes_used']}, perplexity {r['perplexity']:.1f}")
    return 0


RECIPE = Recipe("audio-tokenizer", "an audio tokenizer (VQ over log-mel frames) on missions spoken by espeak-ng",
                AudioTokenizerTask, run, resume_training, load_nothing, evaluate, model_fields=(), build_model=build_model)
