"""Smoke test of benchmarks/bench_babyai.py: `--quick` runs a tiny main job and a tiny BabyAI-1.1-style
baseline beside it and writes the target table with the ratios; `--run` reads a finished run and
refuses a folder without eval.json."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "bench_babyai.py"


def test_bench_babyai_quick_and_run(tmp_path):
    out = tmp_path / "babyai.json"
    proc = subprocess.run([sys.executable, str(SCRIPT), "--quick", "--out", str(out)], cwd=ROOT, capture_output=True,
                          text=True, timeout=600)  # a hang guard: seconds alone, minutes on a loaded machine
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    res = json.loads(out.read_text())
    rows = {r["figure"]: r for r in res["figures"]}
    success = rows["success, sampled policy, held-out seeds"]
    assert success["target"] == 0.97 and 0 <= success["value"] <= 1 and success["met"] == (success["value"] >= 0.97)
    wall = rows["main job wall time, minutes (collect + train + evaluate)"]
    assert 0 < wall["value"] < 15 and wall["met"] is True
    assert "success, sampled policy" in proc.stdout and res["machine"]

    base = res["baseline"]  # trained a few updates on the run's own data, played on the run's eval seeds
    assert base["updates"] == 3 and base["params"] > 0 and base["train_episodes"] == 40 and base["val_loss"] > 0
    assert abs(base["run_minutes"] - res["minutes"]) <= 0.01 and base["budget_minutes"] == 1.0  # quick: the update cap ends it
    for key, what in (("real", "sampled"), ("real_greedy", "greedy")):
        assert base[key]["episodes"] == 6 and base[key]["seeds"] == [2_000_000, 2_000_005]
        bl, wl = rows[f"baseline (BabyAI-1.1-style) success, {what} policy, same seeds"]["value"], base[key]["success"]
        assert bl == wl and 0 <= bl <= 1
        ratio = rows[f"ratio worldloom / baseline, {what} success"]
        world = rows["success, sampled policy, held-out seeds" if what == "sampled" else "success, greedy policy, same seeds"]
        expected = world["value"] / bl if bl else None
        assert ratio["value"] == base["ratio"][what] == expected and ratio["target"] == 1.0
        assert ratio["met"] == (None if expected is None else expected >= 1.0)
    assert "ratio worldloom / baseline, sampled success" in proc.stdout

    empty = tmp_path / "empty"
    empty.mkdir()
    proc = subprocess.run([sys.executable, str(SCRIPT), "--run", str(empty), "--out", str(tmp_path / "x.json")],
                          cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1 and "no eval.json" in proc.stderr

    (empty / "eval.json").write_text("{}")  # an eval.json but no run around it: --baseline cannot find the data
    proc = subprocess.run([sys.executable, str(SCRIPT), "--run", str(empty), "--baseline", "--out", str(tmp_path / "x.json")],
                          cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1 and "not a worldloom run folder" in proc.stderr


def test_baseline_ratios_pair_sampled_with_sampled_and_greedy_with_greedy():
    sys.path.insert(0, str(SCRIPT.parent))
    try:
        import bench_babyai
    finally:
        sys.path.remove(str(SCRIPT.parent))
    base = {"real": {"success": 0.8}, "real_greedy": {"success": 0.5}}
    rows = {r["figure"]: r for r in bench_babyai.baseline_rows(
        {"real": {"policy": "sampled", "success": 0.6}, "real_greedy": {"success": 0.55}}, base)}
    assert rows["ratio worldloom / baseline, sampled success"]["value"] == 0.6 / 0.8
    assert rows["ratio worldloom / baseline, greedy success"]["value"] == 0.55 / 0.5
    assert rows["ratio worldloom / baseline, sampled success"]["met"] is False
    assert rows["ratio worldloom / baseline, greedy success"]["met"] is True
    # a run evaluated greedily (eval.greedy=true) has only a greedy figure; a baseline that never succeeded, no ratio
    rows = {r["figure"]: r for r in bench_babyai.baseline_rows(
        {"real": {"policy": "greedy", "success": 0.7}}, {"real": {"success": 0.4}, "real_greedy": {"success": 0.0}})}
    assert rows["ratio worldloom / baseline, sampled success"]["value"] is None
    assert rows["ratio worldloom / baseline, greedy success"]["value"] is None
    assert rows["baseline (BabyAI-1.1-style) success, greedy policy, same seeds"]["value"] == 0.0
