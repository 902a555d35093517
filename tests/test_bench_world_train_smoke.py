"""Smoke test of benchmarks/bench_world_train.py: `--quick` runs every case end to end and writes its JSON."""

from __future__ import annotations

from conftest import run_benchmark


def test_bench_world_train_quick(tmp_path):
    res, out = run_benchmark("bench_world_train.py", "--quick", out=tmp_path / "wt.json")
    cases = res["results"]
    assert set(cases) == {"tokens", "encoded", "encoded+film", "encoded, torch decoder"}
    assert all(c["s_per_step"] > 0 and c["play_steps_per_batch"] > 0 for c in cases.values())
    assert cases["encoded+film"]["params"] > cases["encoded"]["params"]  # the FiLM layer is there
    assert "x faster per training step" in out
