#!/usr/bin/env python
"""Audio: speech synthesis, log-mel, audio-tokenizer and Griffin-Lim throughput, in one run.

    python benchmarks/bench_audio.py              # the tokenizer-audio preset's shapes
    python benchmarks/bench_audio.py --quick      # tiny shapes, seconds (smoke test)

With random tokenizer weights (speed does not depend on what the weights have learned), on
missions spoken by espeak-ng:

* speech: utterances spoken per second (one espeak-ng process each, written to a temporary wav);
* log-mel: seconds of speech turned into log-mel frames per second of compute (torch.stft);
* tokenizer: ``AudioTokenizer.encode_batch`` / ``decode_batch`` in audio tokens per second (clips of
  ``audio.crop`` frames, batch 64);
* vocoder: seconds of speech rebuilt by Griffin-Lim (``audio.griffin_lim`` iterations) per second.

Each figure is the best of ``--repeats`` timings. Nothing here runs in the test suite's timing:
`tests/test_bench_audio_smoke.py` only checks that ``--quick`` writes its JSON.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]


def best(fn, repeats: int) -> float:
    """The shortest of ``repeats`` timings of ``fn()`` (seconds)."""
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return min(times)


def measure(quick: bool, repeats: int) -> dict:
    from worldloom.audio.autoencoder import MelAutoencoder
    from worldloom.audio.mel import MelSpec
    from worldloom.audio.speech import Voice, missions, speak
    from worldloom.audio.tokenizer import AudioTokenizer
    from worldloom.config import build_config

    small = ["audio.channels=16", "audio.codebook=64", "audio.griffin_lim=4"] if quick else []
    ac = build_config("tokenizer-audio", small).audio
    texts = missions()[:4 if quick else 36]
    voices = [Voice("en-us", "m3", 160, 50)] * len(texts)
    t = best(lambda: [speak(x, v, ac.sample_rate) for x, v in zip(texts, voices)], repeats)
    waves = [speak(x, v, ac.sample_rate) for x, v in zip(texts, voices)]
    seconds = sum(len(w) for w in waves) / ac.sample_rate
    spec = MelSpec(ac)
    t_mel = best(lambda: [spec.logmel(w) for w in waves], repeats)
    torch.manual_seed(0)
    tok = AudioTokenizer(MelAutoencoder(ac))
    clips = np.random.default_rng(0).normal(-3, 2, (8 if quick else 64, ac.crop, ac.n_mels)).astype(np.float32)
    ids = tok.encode_batch({"mel": clips})
    t_enc = best(lambda: tok.encode_batch({"mel": clips}), repeats)
    t_dec = best(lambda: tok.decode_batch(ids), repeats)
    mel = spec.logmel(waves[0])
    t_gl = best(lambda: spec.griffin_lim(mel), repeats)
    return {"utterances": len(texts), "speech_seconds": seconds,
            "speak_utterances_per_s": len(texts) / t, "logmel_speech_s_per_s": seconds / t_mel,
            "tokens_per_clip": tok.n_tokens, "encode_tokens_per_s": ids.size / t_enc, "decode_tokens_per_s": ids.size / t_dec,
            "griffin_lim_iterations": ac.griffin_lim,
            "griffin_lim_speech_s_per_s": len(waves[0]) / ac.sample_rate / t_gl}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[1])
    p.add_argument("--quick", action="store_true")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "audio.json"))
    args = p.parse_args()
    sys.path.insert(0, str(ROOT / "src"))
    torch.set_num_threads(args.threads)
    res = {"quick": args.quick, "date_utc": datetime.now(timezone.utc).isoformat(timespec="seconds"),
           "machine": {"platform": platform.platform(), "cores": torch.get_num_threads(), "torch": torch.__version__},
           "audio": measure(args.quick, 1 if args.quick else args.repeats)}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(res, indent=2))
    a = res["audio"]
    print(f"speech {a['speak_utterances_per_s']:.1f} utterances/s; log-mel {a['logmel_speech_s_per_s']:.0f}x real time; "
          f"tokenizer encode {a['encode_tokens_per_s']:,.0f} / decode {a['decode_tokens_per_s']:,.0f} tokens/s; "
          f"Griffin-Lim ({a['griffin_lim_iterations']} iterations) {a['griffin_lim_speech_s_per_s']:.1f}x real time")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
