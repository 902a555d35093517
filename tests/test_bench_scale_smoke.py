"""Smoke test of benchmarks/bench_scale.py: --quick trains 1 process and 2 ranks (ddp, fsdp) end to end."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_bench_scale_quick(tmp_path):
    out = tmp_path / "scale.json"
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "bench_scale.py"), "--quick", "--out", str(out)],
                          cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    rows = json.loads(out.read_text())["rows"]
    assert [(r["ranks"], r["dist"]) for r in rows] == [(1, "none"), (2, "ddp"), (2, "fsdp")]
    assert [r["logged_world"] for r in rows] == [1, 2, 2]  # the runs really had that many ranks
    assert all(r["tokens_per_s"] > 0 and r["steps"] == 3 for r in rows)
