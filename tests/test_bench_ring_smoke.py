"""Smoke test of benchmarks/bench_ring.py: `--quick` runs its three cases end to end and writes its JSON."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "bench_ring.py"


def _mib(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x) and x >= 0


def test_bench_ring_quick(tmp_path):
    out = tmp_path / "ring.json"
    proc = subprocess.run([sys.executable, str(SCRIPT), "--quick", "--out", str(out)],
                          cwd=ROOT, capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    res = json.loads(out.read_text())
    assert res["quick"] is True and res["date_utc"] and res["machine"]["torch"]
    assert res["ranks"] == 2 and res["tokens"] == [256]
    row = res["results"]["256"]
    assert row["math_scores_mb"] == round(1 * 2 * 256**2 * 4 / 2**20, 1)
    for kind, world in (("full", 1), ("ring1", 1), ("ring2", 2)):
        case = row[kind]
        assert case["ranks"] == world and len(case["per_rank"]) == world
        for rank in case["per_rank"]:
            assert rank["peak_rss_mb"] >= rank["baseline_rss_mb"] > 0
            assert rank["added_mb"] == round(rank["peak_rss_mb"] - rank["baseline_rss_mb"], 1)
            assert _mib(rank["inputs_mb"]) and rank["seconds"] > 0
        assert case["added_mb_max"] == max(r["added_mb"] for r in case["per_rank"])
    # each ring rank holds half the tokens: half the input bytes of the one-process cases
    assert math.isclose(row["ring2"]["inputs_mb_per_rank"] * 2, row["full"]["inputs_mb_per_rank"], abs_tol=0.11)
    assert "| 256 |" in proc.stdout and "ring, 2 ranks (per rank)" in proc.stdout
