"""`worldloom eval` of an audio-tokenizer run: what its codes keep of held-out speech."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from ..vision.quantizers import perplexity
from .autoencoder import MEAN, SCALE
from .utterances import frames, load_utterances


def reconstruction(model, data: dict) -> dict:
    """Normalised log-mel MSE of every utterance through codes and back, beside the MSE of predicting each
    frame by the set's mean frame (what a tokenizer that keeps nothing would score); codes used, perplexity."""
    err, base, codes = [], [], []
    mean = (data["mel"].astype(np.float32).mean(0) - MEAN) / SCALE
    for i in range(len(data["lengths"])):
        mel = torch.from_numpy(frames(data, i))[None]
        c = model.encode(mel)
        x = (mel[0].numpy() - MEAN) / SCALE
        err.append(float((((model.decode(c)[0].numpy() - MEAN) / SCALE - x) ** 2).mean()))
        base.append(float(((x - mean) ** 2).mean()))
        codes.append(c.reshape(-1))
    codes = torch.cat(codes)
    return {"utterances": len(err), "mse": float(np.mean(err)), "baseline_mse": float(np.mean(base)),
            "codes_used": int(codes.unique().numel()), "perplexity": perplexity(codes, model.codebook_size)}


def evaluate_audio_tokenizer(run, run_dir: Path) -> dict:
    from ..recipes.audio_tokenizer import SPEECH

    model, ac = run.model.eval(), run.cfg.audio
    res = {"run": str(run_dir), "step": run.state["step"], "codebook": model.codebook_size,
           "tokens_per_second": ac.sample_rate / ac.hop / ac.stack}
    for split in ("val", "voices"):
        res[split] = reconstruction(model, load_utterances(Path(run_dir) / SPEECH / f"{split}.npz"))
    return res
