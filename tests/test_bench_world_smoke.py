"""Smoke test of benchmarks/bench_world.py: `--quick` runs end to end and writes its JSON."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_bench_world_quick(tmp_path):
    out = tmp_path / "world.json"
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "bench_world.py"), "--quick", "--out", str(out)],
                          cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    res = json.loads(out.read_text())
    assert res["collect"]["workers_1"]["episodes_per_s"] > 0 and res["collect"]["workers_2"]["episodes_per_s"] > 0
    rows = res["imagine"]
    assert [r["batch"] for r in rows] == [1, 4]
    assert all(r["tokens"] > 0 and r["parallel"] > 0 and r["ratio"] > 0 for r in rows)
