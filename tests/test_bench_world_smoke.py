"""Smoke test of benchmarks/bench_world.py: `--quick` runs end to end and writes its JSON."""

from __future__ import annotations

from conftest import run_benchmark


def test_bench_world_quick(tmp_path):
    res, _ = run_benchmark("bench_world.py", "--quick", out=tmp_path / "world.json")
    assert res["collect"]["workers_1"]["episodes_per_s"] > 0 and res["collect"]["workers_2"]["episodes_per_s"] > 0
    rows = res["imagine"]
    assert [r["batch"] for r in rows] == [1, 4]
    assert all(r[d] > 0 for r in rows for d in ("tokens", "parallel", "encoded"))
    assert all(set(r["ratio"]) == {"parallel", "encoded"} and min(r["ratio"].values()) > 0 for r in rows)
    assert res["model"]["encoded"]["params"] != res["model"]["tokens"]["params"]  # two designs, two models
