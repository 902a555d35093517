"""Smoke test of benchmarks/bench_pixels.py: `--quick` runs end to end and writes its JSON."""

from __future__ import annotations

import pytest
from conftest import run_benchmark


def test_bench_pixels_quick(tmp_path):
    pytest.importorskip("crafter")
    res, _ = run_benchmark("bench_pixels.py", "--quick", "--worlds", "babyai,babyai-rgb,crafter",
                           out=tmp_path / "pixels.json")
    rows = {r["world"]: r for r in res["worlds"]}
    assert set(rows) == {"babyai (symbolic)", "babyai-rgb", "crafter"}
    assert rows["babyai-rgb"]["tokens_per_frame"] == 49 and rows["crafter"]["tokens_per_frame"] == 64
    assert rows["babyai (symbolic)"]["tokens_per_frame"] == 50 and "encode_frames_per_s" not in rows["babyai (symbolic)"]
    assert all(r["imagine_b1"] > 0 and r["imagine_b4"] > 0 for r in rows.values())
    assert rows["crafter"]["encode_frames_per_s"] > 0 and rows["crafter"]["decode_frames_per_s"] > 0
