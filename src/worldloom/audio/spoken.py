"""Spoken missions inside a world run (``stream.spoken``): which episodes hear their mission, in which voice.

A world run with ``stream.spoken`` = s > 0 lays a share s of its training episodes out with the
mission as speech: ``<bos> audio codes <sep>`` instead of ``<bos> words <sep>`` (the codes of an
audio tokenizer, ``worldloom.audio.tokenizer``; ``StreamLayout.prefix(mission, voice)``). Both
choices depend on the episode's environment seed alone, so that a run, its resume and its
evaluation agree without storing anything:

- ``is_spoken(seed, s)``: a uniform draw of a generator seeded by ``[SALT, seed, 2]`` below s;
- ``voice_for(seed, held_out)``: ``speech.draw_voice`` from a generator seeded by ``[SALT, seed, 0]``
  among the training voices (none of ``held_out``, the tokenizer's ``audio.held_out_voices``);
  ``voice_for(seed, held_out, held=True)`` draws among the held-out voices instead (seeded by
  ``[SALT, seed, 1]``), the evaluation's voices that neither the tokenizer nor the world model heard.

``mission_codes(tok, mission, voice)``: espeak-ng speaks the mission, its log-mel frames go through
the tokenizer: (n,) codes, about 21 per second of speech.
"""

from __future__ import annotations

import numpy as np

from .speech import Voice, draw_voice, speak

SALT = 1607  # keeps these draws apart from every other use of an episode's seed


def is_spoken(seed: int, share: float) -> bool:
    """Whether the episode of environment seed ``seed`` hears its mission, at a spoken share of ``share``."""
    if share <= 0:
        return False
    return bool(np.random.default_rng([SALT, int(seed), 2]).random() < share)


def voice_for(seed: int, held_out: set[str], held: bool = False) -> Voice:
    """The voice that speaks the mission of seed ``seed``: a training voice, or (``held``) a held-out one."""
    return draw_voice(np.random.default_rng([SALT, int(seed), int(held)]), held_out, held=held)


def mission_codes(tok, mission: str, voice: Voice) -> np.ndarray:
    """``mission`` spoken by ``voice`` -> the audio tokenizer ``tok``'s codes (n,) int64."""
    return tok.encode(tok.spec.logmel(speak(mission, voice, tok.cfg.sample_rate)))
