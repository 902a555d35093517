"""`worldloom eval` of a listen run: transcription of held-out speech, and the model's own speech heard back.

- ``val``: held-out utterances (other draws of mission, voice, speed, pitch; training voices);
  ``voices``: utterances in voices never spoken in training (``audio.held_out_voices``). Greedy
  words after ``<bos> codes <hear>``; ``exact`` = transcripts equal to the mission.
- ``speak``: every mission of the grammar (at most ``audio.eval_utterances``) after ``<bos> words <say>``, greedy codes; ``direct`` =
  those codes transcribed by the same model; ``heard_back`` = the codes decoded to log-mel frames,
  Griffin-Lim to a waveform (kept as ``spoken/*.wav``), the waveform's log-mel frames encoded again
  and transcribed: the whole way through sound.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from ..io import atomic_write_bytes
from .listen import ListenVocab, exact, greedy
from .speech import missions, wav_bytes

SPOKEN = "spoken"
MAX_CODES = 120  # the longest speech the model may say, in codes (~5.6 s)


def transcribe(model, vocab: ListenVocab, codes: list) -> list[str]:
    prompts = [[vocab.bos, *map(int, c), vocab.hear] for c in codes]
    return [vocab.decode_text(a) for a in greedy(model, prompts, vocab.first_word, vocab.size, vocab.eos, 12)]


def examples(said: list[str], truth: list[str], extra: list[str] | None = None, n: int = 3) -> list[dict]:
    return [{"said": s, "truth": t, **({"voice": extra[i]} if extra else {})} for i, (s, t) in enumerate(zip(said[:n], truth[:n]))]


def speak_missions(model, vocab: ListenVocab, tok, texts: list[str], out: Path | None) -> dict:
    """The model speaks each text; its codes are transcribed directly and through a Griffin-Lim waveform."""
    prompts = [[vocab.bos, *vocab.encode_text(t), vocab.say] for t in texts]
    codes = greedy(model, prompts, 0, vocab.codes, vocab.eos, MAX_CODES)
    direct = transcribe(model, vocab, codes)
    again = []
    for i, c in enumerate(codes):
        wave = tok.wave(np.array(c or [0]))
        again.append(tok.encode(tok.spec.logmel(wave)))
        if out is not None and i < 4:
            atomic_write_bytes(out / f"{i}-{texts[i].replace(' ', '_')}.wav", wav_bytes(wave, tok.cfg.sample_rate))
    heard = transcribe(model, vocab, again)
    return {"missions": len(texts), "direct": exact(direct, texts), "heard_back": exact(heard, texts),
            "codes_mean": float(np.mean([len(c) for c in codes])), "examples": examples(heard, texts)}


def evaluate_listen(run, run_dir: Path) -> dict:
    from ..recipes.listen import audio_data, utterance_codes

    model, ac = run.model.eval(), run.cfg.audio
    tok, data = audio_data(run.cfg, run_dir)
    vocab = ListenVocab.for_missions(tok.vocab_size)
    res = {"run": str(run_dir), "step": run.state["step"], "held_out_voices": ac.held_out_voices}
    for split in ("val", "voices"):
        codes = utterance_codes(tok, data[split], ac.eval_utterances)
        truth = [str(t) for t in data[split]["text"][:len(codes)]]
        said = transcribe(model, vocab, codes)
        res[split] = {"utterances": len(codes), "exact": exact(said, truth),
                      "examples": examples(said, truth, [str(v) for v in data[split]["voice"]])}
    if ac.speak > 0:
        res["speak"] = speak_missions(model, vocab, tok, missions()[:ac.eval_utterances], Path(run_dir) / SPOKEN)
    return res


def summary(res: dict) -> list[str]:
    lines = [f"{res['run']} (step {res['step']}): transcription exact match "
             f"{res['val']['exact']:.1%} on {res['val']['utterances']} held-out utterances, "
             f"{res['voices']['exact']:.1%} on {res['voices']['utterances']} in held-out voices ({res['held_out_voices']})"]
    if "speak" in res:
        s = res["speak"]
        lines.append(f"  speaking: {s['missions']} missions said by the model and transcribed back by it: "
                     f"{s['heard_back']:.1%} through the waveform (Griffin-Lim, {SPOKEN}/*.wav), {s['direct']:.1%} from its codes")
    for e in res["voices"]["examples"]:
        lines.append(f"  {e['voice']}: heard {e['said']!r} for {e['truth']!r}")
    return lines
