"""Smoke test of benchmarks/bench_foundation.py: `--quick` runs end to end and writes its JSON."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("transformers")
pytest.importorskip("worldloom.export.hf")

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "bench_foundation.py"


def _positive(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x) and x > 0


def test_bench_foundation_quick(tmp_path):
    out = tmp_path / "foundation.json"
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), "--quick", "--out", str(out)],
        cwd=ROOT, capture_output=True, text=True, timeout=180,
    )
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    res = json.loads(out.read_text())

    assert res["quick"] is True
    for key in ("platform", "cpu_model", "cores", "torch"):
        assert res["machine"][key]
    assert res["date_utc"]

    assert _positive(res["matmul"]["fp32_peak_gflops"]) and _positive(res["matmul"]["bf16_peak_gflops"])

    train = res["train"]
    assert _positive(train["flops_per_token"]) and _positive(train["flop_params_N"])
    llama = train["llama"]
    assert llama["attn_implementation"] == "sdpa"
    assert llama["flops_per_token"] == train["flops_per_token"]  # same configuration, same FLOPs (tied head counted once more in both)
    assert llama["params_total"] == train["params_total"]
    timed = train["rounds"] * train["steps_per_round"]
    assert timed == train["timed_steps"] >= 2
    for precision in ("fp32", "bf16"):
        for figures in (train[precision], llama[precision]):
            for key in ("tokens_per_s", "step_s_median", "achieved_gflops", "mfu", "mfu_vs_bf16_peak", "mfu_vs_fp32_peak"):
                assert _positive(figures[key]), (precision, key)
            assert len(figures["step_s_all"]) == timed
            assert figures["mfu"] == figures[f"mfu_vs_{precision}_peak"]
        assert _positive(train["ratio_vs_llama"][precision])
        tps = train[precision]["tokens_per_s"] / llama[precision]["tokens_per_s"]
        assert train["ratio_vs_llama"][precision] == pytest.approx(tps, rel=1e-2)
    # same weights, same tokens, same objective: the very first losses agree (fp32 exactly up to rounding)
    assert train["fp32"]["first_loss"] == pytest.approx(llama["fp32"]["first_loss"], rel=1e-5)
    assert train["bf16"]["first_loss"] == pytest.approx(llama["bf16"]["first_loss"], rel=2e-2)

    for dtype in ("fp32", "bf16"):
        dec = res["decode"][dtype]
        assert _positive(dec["cached_b1_tokens_per_s"]) and _positive(dec["uncached_b1_tokens_per_s"])
        assert any(k.startswith("cached_b") and k != "cached_b1_tokens_per_s" for k in dec)  # a batched figure too
        hf = res["hf"][dtype]
        for key in ("worldloom_b1_tokens_per_s", "hf_b1_tokens_per_s", "ratio_b1"):
            assert _positive(hf[key]), (dtype, key)
        assert 0.0 <= hf["greedy_agreement_b1"] <= 1.0  # informative only: near-ties may flip on random weights

    assert "1. matmul" in proc.stdout and "worldloom / HF" in proc.stdout and "worldloom / llama train" in proc.stdout
