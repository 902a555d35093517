"""Smoke test of benchmarks/bench_babyai.py: `--quick` runs a tiny main job and writes the target table;
`--run` reads a finished run and refuses a folder without eval.json."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "bench_babyai.py"


def test_bench_babyai_quick_and_run(tmp_path):
    out = tmp_path / "babyai.json"
    proc = subprocess.run([sys.executable, str(SCRIPT), "--quick", "--out", str(out)], cwd=ROOT, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    res = json.loads(out.read_text())
    rows = {r["figure"]: r for r in res["figures"]}
    success = rows["success, sampled policy, held-out seeds"]
    assert success["target"] == 0.95 and 0 <= success["value"] <= 1 and success["met"] == (success["value"] >= 0.95)
    wall = rows["main job wall time, minutes (collect + train + evaluate)"]
    assert 0 < wall["value"] < 15 and wall["met"] is True
    assert "success, sampled policy" in proc.stdout and res["machine"]

    empty = tmp_path / "empty"
    empty.mkdir()
    proc = subprocess.run([sys.executable, str(SCRIPT), "--run", str(empty), "--out", str(tmp_path / "x.json")],
                          cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1 and "no eval.json" in proc.stderr
