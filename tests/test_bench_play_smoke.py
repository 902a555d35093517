"""Smoke test of benchmarks/bench_play.py: --quick over a tiny world run, through a real server and in process."""

from __future__ import annotations

import pytest
from conftest import run_benchmark

pytest.importorskip("fastapi", reason="the serve extra is not installed (pip install 'worldloom[serve]')")
pytest.importorskip("httpx", reason="httpx is not installed (the test extra has it)")


@pytest.mark.parametrize("transport, extra", [("http", []), ("asgi", ["--imagination-only"])])
def test_bench_play_quick(world_run, tmp_path, transport, extra):
    res, out = run_benchmark("bench_play.py", str(world_run), "--quick", "--threads", "1", "--transport", transport,
                             *extra, out=tmp_path / "play.json")
    rows = res["play"]
    assert [r["mode"] for r in rows] == ["tokens", "parallel", "fast"] and all(r["steps"] == 3 for r in rows)
    assert all(r["frames_per_s"] > 0 and 0 < r["step_share"] <= 1 for r in rows)
    assert all(abs(r["vs_target"] - r["frames_per_s"] / 10) < 0.01 for r in rows)
    assert res["transport"] == transport and "vs 10/s" in out and "target: 10 imagined frames/s" in out
