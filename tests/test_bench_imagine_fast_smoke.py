"""Smoke test of benchmarks/bench_imagine_fast.py: tiny settings run end to end and write its JSON."""

from __future__ import annotations

from conftest import run_benchmark


def test_bench_imagine_fast_tiny(world_run, tmp_path):
    res, out = run_benchmark("bench_imagine_fast.py", str(world_run), "--batches", "1", "2", "--steps", "1",
                             "--threads", "1", out=tmp_path / "fast.json")
    rows = res["imagine"]
    assert [r["batch"] for r in rows] == [1, 2]
    assert all(r["identical"] for r in rows)  # fast imagines exactly what tokens imagines
    assert all(r[m] > 0 for r in rows for m in ("tokens", "fast", "fast_head", "fast_paced", "parallel"))
    assert all(r["forwards_per_step"]["tokens"] == 53 and r["forwards_per_step"]["parallel"] == 4 for r in rows)
    assert all(4 <= r["forwards_per_step"]["fast"] <= 53 and r["fast_stats"]["frame_passes"] == 1 for r in rows)
    assert all(r["fast_paced_stats"]["frame_passes"] + r["fast_paced_stats"]["token_frames"] == 1 for r in rows)
    assert "identical to tokens: True" in out
