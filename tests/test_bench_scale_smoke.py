"""Smoke test of benchmarks/bench_scale.py: --quick trains 1 process and 2 ranks (ddp, fsdp) end to end."""

from __future__ import annotations

from conftest import run_benchmark


def test_bench_scale_quick(tmp_path):
    rows = run_benchmark("bench_scale.py", "--quick", "--dist", "fsdp", out=tmp_path / "scale.json")[0]["rows"]  # ddp: test_distributed
    assert [(r["ranks"], r["dist"]) for r in rows] == [(1, "none"), (2, "fsdp")]
    assert [r["logged_world"] for r in rows] == [1, 2]  # the runs really had that many ranks
    assert all(r["tokens_per_s"] > 0 and r["steps"] == 3 for r in rows)
