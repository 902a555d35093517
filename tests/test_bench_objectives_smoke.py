"""Smoke test of benchmarks/bench_objectives.py: `--quick` trains objective=next and objective=combined for
seconds through the real CLI, scores the held-out next-token loss of both and writes their ratio."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "bench_objectives.py"


def test_bench_objectives_quick(tmp_path):
    text = tmp_path / "corpus.txt"
    text.write_text("".join(f"line {i % 37}: the quick brown fox jumps over the lazy dog.\n" for i in range(400)))
    out = tmp_path / "objectives.json"
    proc = subprocess.run([sys.executable, str(SCRIPT), "--quick", "--minutes", "0.02", "--alpha", "0.5",
                           "--data", str(text), "--out", str(out)], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    res = json.loads(out.read_text())
    assert [r["objective"] for r in res["runs"]] == ["next", "combined"]
    tokens = {r["heldout"]["tokens"] for r in res["runs"]}
    assert len(tokens) == 1  # both scored on the same held-out characters
    for r in res["runs"]:
        assert r["status"] == "ok" and r["steps"] > 0 and "train.mask_alpha=0.5" in r["cmd"]
        assert math.isfinite(r["heldout"]["loss"]) and 0 < r["heldout"]["loss"] < 10
    assert res["runs"][0]["last_train_loss_masked"] is None and res["runs"][1]["last_train_loss_masked"] > 0
    loss = res["heldout_next_token_loss"]
    assert res["ratio_combined_over_next"] == loss["combined"] / loss["next"]
    assert "ratio combined / next" in proc.stdout
