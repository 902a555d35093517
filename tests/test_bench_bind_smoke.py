"""Smoke test of benchmarks/bench_bind.py --quick: the hub run and the direct reference train, evaluate,
and the table and JSON come out; a second call evaluates the finished runs without retraining."""

from __future__ import annotations

from conftest import run_benchmark


def test_bench_bind_quick(tmp_path):
    args = ("--dir", str(tmp_path), "--quick", "--reference", "--threads", "1")
    res, out = run_benchmark("bench_bind.py", *args, out=tmp_path / "bind.json")
    runs = res["runs"]
    assert set(runs) == {"hub", "direct"} and res["budget"]["quick"] is True
    assert runs["hub"]["trained_pairs"] == ["actions-text", "view-text"] and runs["direct"]["trained_pairs"] == ["view-actions"]
    assert runs["hub"]["pairs"]["view-actions"]["trained"] is False and runs["direct"]["pairs"]["view-actions"]["trained"] is True
    r = runs["hub"]["pairs"]["view-text"]["view_to_text"]
    assert 0 <= r["r1"] <= r["r5"] <= 1 and 0 < r["chance_r1"] < 1
    assert "| hub | view -> actions | no |" in out and "| direct | view -> actions | yes |" in out and "target: view -> text" in out
    _, again = run_benchmark("bench_bind.py", *args, out=tmp_path / "bind2.json")
    assert again.count("evaluating it as it is") == 2
