"""Smoke test of benchmarks/bench_agent.py --quick: data react, a base, two SFT runs, the ReAct loop scored
with and without the calculator, and the table."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_bench_agent_quick(tmp_path):
    cmd = [sys.executable, str(ROOT / "benchmarks" / "bench_agent.py"), "--dir", str(tmp_path), "--quick"]  # (--direct: one more SFT stage)
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=900)  # a hang guard
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    res = json.loads((tmp_path / "agent.json").read_text())
    assert set(res["stages"]) == {"data", "base", "react"}
    assert all(s["rc"] == 0 and s["seconds"] > 0 for s in res["stages"].values())
    assert set(res["eval"]) == {"react + calculator", "react, no tools"}
    for e in res["eval"].values():
        assert e["rows"] == 20 and 0 <= e["accuracy"] <= 1 and sum(e["stopped"].values()) == 20
    assert res["gain_points"] == 100 * (res["eval"]["react + calculator"]["accuracy"] - res["eval"]["react, no tools"]["accuracy"])
    assert "| react + calculator |" in proc.stdout
    again = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert again.returncode == 0 and again.stdout.count("done already") == 4  # an interrupted benchmark continues (stages and scores)
