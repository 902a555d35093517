"""Smoke test of benchmarks/bench_quant.py --quick: a tiny base trained, quantised both ways by `worldloom
quantize` (each on its exact and its FBGEMM kernel), decoded, scored and sized in one process; the JSON and the table are written."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_bench_quant_quick(tmp_path):
    out = tmp_path / "quant.json"
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "bench_quant.py"), "--quick", "--dir", str(tmp_path / "bq"),
                           "--out", str(out), "--threads", "1"], cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    res = json.loads(out.read_text())
    assert set(res["tokens_per_s"]) == {"fp32", "bf16", "int8", "ternary", "int8 fbgemm", "ternary fbgemm"} and all(v > 0 for v in res["tokens_per_s"].values())
    assert max(res["speedup"]["fp32"], res["speedup"]["bf16"]) == 1.0  # ratios against the faster of the two
    assert abs(res["loss_ratio"]["int8"] - 1) < 0.01 and res["loss_ratio"]["fp32"] == 1.0
    assert 0.125 <= res["ternary_linears_vs_fp16"] < 0.13  # 2 bits a weight + one fp32 scale per matrix
    assert res["disk"]["ternary"]["file"] < res["disk"]["int8"]["file"] < res["disk"]["fp32"]
    assert abs(res["loss_ratio"]["int8 fbgemm"] - 1) < 0.05  # 8-bit activations too: close, not exact
    assert "| ternary |" in proc.stdout and "| int8 fbgemm |" in proc.stdout
