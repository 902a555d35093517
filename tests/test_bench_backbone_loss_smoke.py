"""Smoke test of benchmarks/bench_backbone_loss.py: `--quick` trains each backbone for seconds through
the real CLI, scores the held-out text and writes its JSON and plot."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("matplotlib")

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "bench_backbone_loss.py"


def test_bench_backbone_loss_quick(tmp_path):
    text = tmp_path / "corpus.txt"
    text.write_text("".join(f"line {i % 37}: the quick brown fox jumps over the lazy dog.\n" for i in range(400)))
    out = tmp_path / "loss.json"
    proc = subprocess.run([sys.executable, str(SCRIPT), "--quick", "--minutes", "0.03", "--backbones", "transformer,mamba,moe",
                           "--data", str(text), "--out", str(out)], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    res = json.loads(out.read_text())
    assert (tmp_path / "loss.png").stat().st_size > 0
    assert list(res["results"]) == ["transformer", "mamba", "moe"]
    n_val = None
    for bb, r in res["results"].items():
        assert r["status"] == "ok", (bb, r)
        held = r["heldout"]
        assert math.isfinite(held["loss"]) and 0 < held["loss"] < 10, (bb, held)
        n_val = held["tokens"] if n_val is None else n_val
        assert held["tokens"] == n_val  # every backbone scored on the same held-out characters
        assert r["steps"] > 0 and r["tokens_trained"] == r["steps"] * 4 * 64
        assert r["curve"] and r["curve"][-1]["step"] == r["steps"]
    moe, dense = res["sizing"]["moe"]["params"], res["sizing"]["transformer"]["params"]
    assert moe["total"] > dense["total"] and abs(moe["active"] - dense["total"]) < 0.1 * dense["total"]
    assert "held-out loss" in proc.stdout
