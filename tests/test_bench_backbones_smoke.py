"""Smoke test of benchmarks/bench_backbones.py: `--quick` runs end to end and writes its JSON and plot."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("matplotlib")

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "bench_backbones.py"
BACKBONES = ("transformer", "moe")  # measured in subprocesses; every backbone has its unit tests, the hybrid's sizing below


def _positive(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x) and x > 0


def test_bench_backbones_quick(tmp_path):
    out = tmp_path / "backbones.json"
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), "--quick", "--contexts", "64", "--backbones", ",".join(BACKBONES), "--out", str(out)],  # 2 processes, not 12
        cwd=ROOT, capture_output=True, text=True, timeout=120,
    )
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    res = json.loads(out.read_text())
    assert (tmp_path / "backbones.png").stat().st_size > 0  # the plot, next to the JSON

    assert res["quick"] is True and res["date_utc"]
    for key in ("platform", "cpu_model", "cores", "torch"):
        assert res["machine"][key]
    assert res["contexts"] == [64]
    assert res["backbones"] == list(BACKBONES)

    models = res["sizing"]["models"]
    assert set(models) == set(BACKBONES)
    for bb in BACKBONES:
        p = models[bb]["params"]
        assert _positive(models[bb]["n_layer"])
        assert _positive(p["total"]) and _positive(p["active"]) and _positive(p["non_embedding"])
    sys.path.insert(0, str(ROOT / "benchmarks"))
    from bench_backbones import size_models

    hybrid = size_models(["hybrid"], 250_000, 64, 2, 256, ["mamba", "mamba", "attn"])["hybrid"]  # --quick's sizes
    assert hybrid["n_layer"] % 3 == 0 and "attn" in hybrid["config"]["layers"] and _positive(hybrid["params"]["total"])
    # MoE: more parameters in total, about the dense transformer's active ones
    moe, dense = models["moe"]["params"], models["transformer"]["params"]
    assert moe["total"] > 2 * dense["total"]
    assert abs(moe["active"] - dense["total"]) < 0.05 * dense["total"]

    for bb in BACKBONES:
        for ctx in ("64",):
            case = res["results"][bb][ctx]
            assert case["status"] == "ok", (bb, ctx, case)
            for key in ("tokens_per_s", "step_s_median", "batch"):
                assert _positive(case["train"][key]), (bb, ctx, key)
            for key in ("ms_per_token", "ms_per_token_mean", "prefill_s"):
                assert _positive(case["decode"][key]), (bb, ctx, key)
            assert case["decode"]["prompt_len"] == int(ctx) - 33 and case["decode"]["steps"] == 32
            assert _positive(case["peak_rss_mb"]) and _positive(case["baseline_rss_mb"])
            assert case["peak_rss_mb"] >= case["baseline_rss_mb"]

    assert "decode ms/token" in proc.stdout and "train tokens/s" in proc.stdout and "peak RSS" in proc.stdout
