"""Smoke test of benchmarks/bench_serve.py: `--quick` (4 streaming clients, two real servers) runs end to end."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("fastapi", reason="the serve extra is not installed (pip install 'worldloom[serve]')")
pytest.importorskip("uvicorn", reason="the serve extra is not installed (pip install 'worldloom[serve]')")
pytest.importorskip("httpx", reason="httpx is not installed (the test extra has it)")

ROOT = Path(__file__).resolve().parents[1]


def test_bench_serve_quick(tmp_path):
    out = tmp_path / "serve.json"
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "bench_serve.py"), "--quick", "--out", str(out)],
                          cwd=ROOT, capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    res = json.loads(out.read_text())
    assert res["quick"] is True and res["zero_errors"] is True and res["speedup"] > 0
    for name, batch in (("continuous", 4), ("one_at_a_time", 1)):
        m = res["modes"][name]
        assert m["max_batch"] == batch and m["requests"] == 4 and m["finished"] == 4 and m["errors"] == 0
        assert m["completion_tokens"] == 4 * 8 and m["tokens_per_s"] > 0
        assert 0 < m["ttft_ms"]["p50"] <= m["ttft_ms"]["p99"] and m["itl_ms"]["p50"] is not None
        assert m["rss_peak_mb"] > 0
