"""The listen recipe: one model hears spoken missions (speech -> text) and speaks them (text -> speech).

    worldloom train babyai-audio                         # tokenizer stage, then the stream model (~10 min on 2 cores)
    worldloom train babyai-audio audio.tokenizer=runs/tokenizer-audio   # reuse a trained audio tokenizer
    worldloom eval runs/babyai-audio --json              # transcription on held-out utterances and voices; speaking

An audio-tokenizer run (``audio.tokenizer``, else trained first into ``<run>/tokenizer`` for
``audio.tokenizer_steps`` steps) gives the codes and the utterances: its ``speech/`` folder (train;
val: held-out utterances in training voices; voices: held-out voices). Each utterance becomes a
``hear`` row (codes, then its words) and a ``say`` row (words, then codes) of one vocabulary
(``worldloom.audio.listen``); an ``LWM`` learns them through the one training loop, a share
``audio.speak`` of each batch speaking. The evaluation (``eval.json``): exact-match transcription on
both held-out sets; and every mission spoken by the model (greedy codes), decoded by the
quantiser and Griffin-Lim to a waveform (``spoken/*.wav``), read back to codes and transcribed by
the same model.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

from ..config import RunConfig, from_dict, load_preset, to_dict
from ..errors import CheckpointError, ConfigError
from ..io import read_json, write_json
from ..losses import language_model_loss, world_stream_loss
from ..runtime import autocast
from . import Recipe, resume_training

TOKENIZER_DIR = "tokenizer"
VOCAB = "listen.json"
EVAL = "eval.json"
STAGE_PRESET = "tokenizer-audio"


def tokenizer_dir(cfg: RunConfig, run_dir: Path, folder: str = TOKENIZER_DIR) -> Path:
    """The audio-tokenizer run of a run: ``audio.tokenizer``, else its own stage ``<run>/<folder>``."""
    return Path(cfg.audio.tokenizer) if cfg.audio.tokenizer else Path(run_dir) / folder


def stage_config(cfg: RunConfig, run_dir: Path, folder: str = TOKENIZER_DIR) -> RunConfig:
    """The tokenizer stage: preset tokenizer-audio with the run's audio settings, seed, threads and device,
    audio.tokenizer_steps steps, in ``<run>/<folder>``."""
    data = load_preset(STAGE_PRESET)
    data.update(name=folder, out_dir=str(run_dir), audio=to_dict(cfg.audio))
    data["data"] = {**data.get("data", {}), "seed": cfg.data.seed}
    tc = cfg.train
    data["train"] = {**data["train"], "max_minutes": 0, "max_steps": cfg.audio.tokenizer_steps, "seed": tc.seed,
                     "threads": tc.threads, "device": tc.device}
    return from_dict(RunConfig, data)


def ensure_tokenizer(cfg: RunConfig, run_dir: Path, progress: bool = True, log=print, folder: str = TOKENIZER_DIR) -> Path:
    """The run's audio-tokenizer run: ``audio.tokenizer``, else trained (or finished) first in ``<run>/<folder>``."""
    from . import audio_tokenizer, tokenizer_stage

    where = tokenizer_dir(cfg, run_dir, folder)
    tokenizer_stage(where, cfg.audio.tokenizer, "audio.tokenizer", "worldloom train tokenizer-audio", audio_tokenizer,
                    lambda: stage_config(cfg, run_dir, folder), f"an audio tokenizer ({cfg.audio.tokenizer_steps} steps)",
                    progress, log)
    return where


def audio_data(cfg: RunConfig, run_dir: Path):
    """(AudioTokenizer, {split: utterances}) of the run's tokenizer run."""
    from ..audio.tokenizer import AudioTokenizer
    from ..audio.utterances import load_utterances
    from .audio_tokenizer import SPEECH

    where = tokenizer_dir(cfg, run_dir)
    tok = AudioTokenizer.from_run(where)
    return tok, {s: load_utterances(where / SPEECH / f"{s}.npz") for s in ("train", "val", "voices")}


def utterance_codes(tok, data: dict, n: int | None = None) -> list[np.ndarray]:
    from ..audio.utterances import frames

    return [tok.encode(frames(data, i)) for i in range(min(n or len(data["lengths"]), len(data["lengths"])))]


class ListenTask:
    objective = staticmethod(world_stream_loss)  # the weighted next-token loss, with loss_hear / loss_say logged apart

    def __init__(self, cfg: RunConfig, run_dir: Path, resuming: bool):
        from ..audio.listen import ListenVocab, pack_rows

        self.cfg, self.run_dir = cfg, Path(run_dir)
        tok, data = audio_data(cfg, self.run_dir)
        self.vocab = ListenVocab.for_missions(tok.vocab_size)
        self.rows = {}
        for split in ("train", "val"):
            codes, texts = utterance_codes(tok, data[split]), data[split]["text"]
            self.rows[split] = {"hear": [self.vocab.hear_row(c, str(t)) for c, t in zip(codes, texts)],
                                "say": [self.vocab.say_row(c, str(t)) for c, t in zip(codes, texts)]}
        longest = max(len(r) for s in self.rows.values() for k in s.values() for r, _ in k)
        if longest - 1 > cfg.model.context:
            raise ConfigError(f"the longest utterance makes a row of {longest} tokens; raise model.context to {longest - 1} or more")
        self.length = longest - 1
        self.packed = {s: {k: pack_rows(v, self.length, self.vocab.eos) for k, v in kinds.items()}
                       for s, kinds in self.rows.items()}

    def model_sizes(self) -> dict:
        return {"vocab_size": self.vocab.size}

    def batch(self, batch_size: int, gen: torch.Generator) -> dict:
        train = self.packed["train"]
        say = torch.rand(batch_size, generator=gen) < self.cfg.audio.speak
        idx = torch.randint(len(train["hear"]["input"]), (batch_size,), generator=gen)
        b = {k: torch.where(say.view(-1, *[1] * (v.ndim - 1)), train["say"][k][idx], v[idx]) for k, v in train["hear"].items()}
        answer = b["weight"] > 0
        return {**b, "part_hear": answer & ~say[:, None], "part_say": answer & say[:, None]}

    @torch.no_grad()
    def val_loss(self, model, precision: str, device) -> float:
        """The weighted next-token loss of every held-out row, hear and say alike (answers only)."""
        was = model.training
        model.eval()
        total, weight = 0.0, 0.0
        for kind in ("hear", "say"):
            rows = self.packed["val"][kind]
            for i in range(0, len(rows["input"]), 128):
                b = {k: v[i:i + 128].to(device) for k, v in rows.items()}
                with autocast(precision, device):
                    out = model(b["input"])
                w = float(b["weight"].sum())
                total += float(language_model_loss(out, b).total) * w
                weight += w
        model.train(was)
        return total / max(weight, 1e-8)

    def save(self, run_dir: Path) -> None:
        write_json(Path(run_dir) / VOCAB, {"codes": self.vocab.codes, "words": list(self.vocab.words),
                                           "tokenizer": str(tokenizer_dir(self.cfg, self.run_dir))})

    def describe(self) -> str:
        n, ac = len(self.rows["train"]["hear"]), self.cfg.audio
        return (f"{n:,} spoken missions as hear and say rows ({ac.speak:.0%} say), {len(self.rows['val']['hear']):,} "
                f"held-out; {self.vocab.codes} audio codes + {len(self.vocab.words)} words, rows of {self.length + 1} tokens")


def load(run_dir: Path) -> tuple[int, dict]:
    from ..audio.listen import ListenVocab

    if not (Path(run_dir) / VOCAB).is_file():
        raise CheckpointError(f"{run_dir} has no {VOCAB}; it is not a finished listen run")
    meta = read_json(Path(run_dir) / VOCAB, "listen vocabulary")
    return ListenVocab(int(meta["codes"]), tuple(meta["words"])).size, {}


def run(cfg: RunConfig, progress: bool = True, log=print) -> dict:
    """Tokenizer stage (unless audio.tokenizer names one), then train, then evaluate (eval.json)."""
    from ..train import train

    ensure_tokenizer(cfg, cfg.run_dir, progress, log)
    out = train(cfg, progress=progress, log=log)
    return {**out, "eval": finish(cfg.run_dir, log)}


def resume(run_dir, overrides: list[str], progress: bool = True, log=print) -> dict:
    out = resume_training(run_dir, overrides, progress, log)
    return {**out, "eval": finish(Path(run_dir), log)}


def finish(run_dir: Path, log=print) -> dict:
    from ..audio.evaluate_listen import evaluate_listen, summary
    from ..run import load_run

    res = evaluate_listen(load_run(run_dir, any_model=True), Path(run_dir))
    write_json(Path(run_dir) / EVAL, res)
    for line in summary(res):
        log(line)
    return res


def evaluate(args, run) -> int:
    from ..audio.evaluate_listen import evaluate_listen, summary

    res = evaluate_listen(run, Path(args.run))
    if args.json:
        print(json.dumps(res, indent=2))
    else:
        print("\n".join(summary(res)))
    return 0


def build_model(cfg: RunConfig):
    """An LWM, built through ``Recipe.build_model`` so that text-only verbs (generate, export, serve) refuse a
    listen run in one line: its vocabulary is audio codes and mission words, not text."""
    from ..model import LWM

    return LWM(cfg.model)


RECIPE = Recipe("listen", "transcription and speech of spoken BabyAI missions in one stream of audio tokens and words",
                ListenTask, run, resume, load, evaluate, build_model=build_model)
