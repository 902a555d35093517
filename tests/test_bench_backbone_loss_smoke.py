"""Smoke test of benchmarks/bench_backbone_loss.py: `--quick` trains each backbone for seconds through
the real CLI, scores the held-out text and writes its JSON and plot."""

from __future__ import annotations

import math

import pytest

from conftest import run_benchmark, small_corpus

pytest.importorskip("matplotlib")


def test_bench_backbone_loss_quick(tmp_path):
    res, stdout = run_benchmark("bench_backbone_loss.py", "--quick", "--minutes", "0.03", "--backbones", "transformer,moe",
                           "--data", str(small_corpus(tmp_path)), out=tmp_path / "loss.json")
    assert (tmp_path / "loss.png").stat().st_size > 0
    assert list(res["results"]) == ["transformer", "moe"]
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
    assert "held-out loss" in stdout
