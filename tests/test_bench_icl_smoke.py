"""Smoke test of benchmarks/bench_icl.py --quick: data icl, train icl, eval --icl on test and seen, the table."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_bench_icl_quick(tmp_path):
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "bench_icl.py"), "--dir", str(tmp_path), "--quick"],
                          cwd=ROOT, capture_output=True, text=True, timeout=900)  # a hang guard
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    res = json.loads((tmp_path / "icl.json").read_text())
    for name in ("test", "seen"):
        assert res[name]["shots"] == [0, 1, 4, 8] and res[name]["queries"] == 24
        assert all(0 <= a <= 1 for a in res[name]["accuracy"].values())
    assert res["steps"] == 6 and isinstance(res["monotone_unseen"], bool)
    assert "| unseen (held-out compositions), 24 queries |" in proc.stdout and "monotone rise" in proc.stdout
