"""Smoke test of benchmarks/bench_audio.py: `--quick` runs end to end and writes its JSON."""

from __future__ import annotations

import math
import shutil

import pytest
from conftest import run_benchmark


@pytest.mark.skipif(shutil.which("espeak-ng") is None, reason="espeak-ng is not installed (apt-get install espeak-ng)")
def test_bench_audio_quick(tmp_path):
    res, out = run_benchmark("bench_audio.py", "--quick", out=tmp_path / "audio.json")
    a = res["audio"]
    assert res["quick"] is True and a["utterances"] == 4 and a["tokens_per_clip"] == 16 and "tokens/s" in out
    for k in ("speak_utterances_per_s", "logmel_speech_s_per_s", "encode_tokens_per_s", "decode_tokens_per_s",
              "griffin_lim_speech_s_per_s", "speech_seconds"):
        assert math.isfinite(a[k]) and a[k] > 0, k
