"""Speech from text: BabyAI missions spoken by espeak-ng in varied voices, speeds and pitches.

``speak(text, voice)`` runs the ``espeak-ng`` program (Debian package ``espeak-ng``) with an
argument list (never a shell string), lets it write a temporary ``.wav`` file and reads it with
Python's ``wave`` module: float32 samples in [-1, 1] at espeak-ng's rate (22050 Hz).

A ``Voice`` is a language (``en``, ``en-us``, ``en-gb``, ...), a variant (``m1`` .. ``m7``,
``f1`` .. ``f4``: espeak-ng's voice variants), a speed in words per minute and a pitch (0-99).
``draw_voice(rng, held_out, held)`` draws one from a seeded generator: with ``held=False`` never a
voice whose language or variant is in ``held_out``; with ``held=True`` only such voices (the
held-out voices of an evaluation).

``missions(...)`` is the mission grammar of BabyAI-GoToLocal-v0 ("go to the red ball", "go to a
green key"): the same strings the level writes, without playing it.
"""

from __future__ import annotations

import shutil
import subprocess
import tempfile
import wave
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..errors import WorldloomError

ESPEAK = "espeak-ng"
LANGUAGES = ("en", "en-us", "en-gb", "en-gb-scotland", "en-gb-x-rp", "en-029")
VARIANTS = ("m1", "m2", "m3", "m4", "m5", "m6", "m7", "f1", "f2", "f3", "f4")
SPEEDS = (130, 200)  # words per minute, drawn uniformly
PITCHES = (25, 75)
COLORS = ("red", "green", "blue", "purple", "yellow", "grey")
OBJECTS = ("ball", "box", "key")


class SpeechError(WorldloomError):
    """espeak-ng is missing or failed."""


@dataclass(frozen=True)
class Voice:
    language: str = "en-us"
    variant: str = "m1"
    speed: int = 160
    pitch: int = 50

    @property
    def name(self) -> str:
        return f"{self.language}+{self.variant}"

    def is_held(self, held_out: set[str]) -> bool:
        return self.language in held_out or self.variant in held_out


def missions() -> list[str]:
    """Every mission BabyAI-GoToLocal-v0 can write: "go to the|a COLOUR OBJECT" (72 strings)."""
    return [f"go to {d} {c} {o}" for d in ("the", "a") for c in COLORS for o in OBJECTS]


def draw_voice(rng: np.random.Generator, held_out: set[str], held: bool = False) -> Voice:
    """A random voice (uniform language, variant, speed, pitch), outside ``held_out`` (or, ``held``, inside it)."""
    pool = [(lang, var) for lang in LANGUAGES for var in VARIANTS if Voice(lang, var).is_held(held_out) == held]
    if not pool:
        raise SpeechError(f"no {'held-out' if held else 'training'} voice is left by audio.held_out_voices="
                          f"{','.join(sorted(held_out))} (languages: {', '.join(LANGUAGES)}; variants: {', '.join(VARIANTS)})")
    lang, var = pool[int(rng.integers(len(pool)))]
    return Voice(lang, var, int(rng.integers(SPEEDS[0], SPEEDS[1] + 1)), int(rng.integers(PITCHES[0], PITCHES[1] + 1)))


def espeak_path() -> str:
    """The espeak-ng program, or one line saying how to install it."""
    path = shutil.which(ESPEAK)
    if path is None:
        raise SpeechError("espeak-ng is not installed; speech needs it: `sudo apt-get install espeak-ng` (Debian/Ubuntu)")
    return path


def read_wav(path: Path) -> tuple[np.ndarray, int]:
    """A 16-bit PCM wav -> (float32 samples in [-1, 1], mono, sample rate)."""
    with wave.open(str(path), "rb") as w:
        if w.getsampwidth() != 2:
            raise SpeechError(f"{path}: expected 16-bit PCM, got {8 * w.getsampwidth()}-bit")
        rate, channels = w.getframerate(), w.getnchannels()
        data = np.frombuffer(w.readframes(w.getnframes()), dtype="<i2")
    x = data.reshape(-1, channels).mean(1) / 32768.0
    return x.astype(np.float32), rate


def wav_bytes(samples: np.ndarray, rate: int) -> bytes:
    """float samples in [-1, 1] -> the bytes of a mono 16-bit PCM wav file."""
    import io

    pcm = (np.clip(np.asarray(samples, np.float64), -1, 1) * 32767).round().astype("<i2")
    buf = io.BytesIO()
    with wave.open(buf, "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(int(rate))
        w.writeframes(pcm.tobytes())
    return buf.getvalue()


def speak(text: str, voice: Voice = Voice(), rate: int = 22050) -> np.ndarray:
    """``text`` spoken by ``voice`` -> float32 samples at ``rate`` (linearly resampled if espeak-ng's rate differs)."""
    program = espeak_path()
    with tempfile.TemporaryDirectory(prefix="worldloom-speech-") as tmp:
        out = Path(tmp) / "speech.wav"
        args = [program, "-v", voice.name, "-s", str(voice.speed), "-p", str(voice.pitch), "-w", str(out), "--", text]
        done = subprocess.run(args, capture_output=True, text=True, timeout=60)
        if done.returncode != 0 or not out.is_file():
            raise SpeechError(f"espeak-ng failed on {text!r} with voice {voice.name}: {done.stderr.strip()[:200] or done.returncode}")
        samples, got = read_wav(out)
    if got != rate:  # linear resampling: speech for a tokenizer, not for listening to
        t = np.arange(int(len(samples) * rate / got)) * (got / rate)
        samples = np.interp(t, np.arange(len(samples)), samples).astype(np.float32)
    return samples
