"""Smoke test of benchmarks/probe_mission.py on the tiny world run: both passes (own and another episode's
mission) score every action of the same episodes, the baseline trains a few seconds, and the table is written."""

from __future__ import annotations

import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_probe_mission(world_run, world_dataset, tmp_path, capsys):
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import probe_mission

    out = tmp_path / "probe.json"
    assert probe_mission.main([str(world_run), "--data", str(world_dataset), "--baseline-minutes", "0.02",
                               "--out", str(out)]) == 0
    res = json.loads(out.read_text())
    assert res["episodes"] == 12 and res["same_mission_after_rotation"] < 12
    for who, r in res["results"].items():
        own, other = r["own"], r["other"]
        assert own["all"]["n"] == other["all"]["n"] > 12 and sum(v["n"] for k, v in own.items() if k != "all") == own["all"]["n"]
        assert all(0 < v["nll"] < 10 and 0 <= v["accuracy"] <= 1 for v in (*own.values(), *other.values()))
        assert own["all"]["nll"] != other["all"]["nll"]  # the missions differ, so the untrained readers move a little
    assert "| BabyAI-1.1-style baseline | 0 |" in capsys.readouterr().out
    assert probe_mission.rotated(["a", "b", "c"]) == ["b", "c", "a"]  # SHIFT 7 on three: one on
