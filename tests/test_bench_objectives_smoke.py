"""Smoke test of benchmarks/bench_objectives.py: `--quick` trains objective=next and objective=combined for
seconds through the real CLI, scores the held-out next-token loss of both and writes their ratio."""

from __future__ import annotations

import math

from conftest import run_benchmark, small_corpus


def test_bench_objectives_quick(tmp_path):
    res, stdout = run_benchmark("bench_objectives.py", "--quick", "--minutes", "0.02", "--alpha", "0.5",
                                "--data", str(small_corpus(tmp_path)), out=tmp_path / "objectives.json")
    assert [r["objective"] for r in res["runs"]] == ["next", "combined"]
    tokens = {r["heldout"]["tokens"] for r in res["runs"]}
    assert len(tokens) == 1  # both scored on the same held-out characters
    for r in res["runs"]:
        assert r["status"] == "ok" and r["steps"] > 0 and "train.mask_alpha=0.5" in r["cmd"]
        assert math.isfinite(r["heldout"]["loss"]) and 0 < r["heldout"]["loss"] < 10
    assert res["runs"][0]["last_train_loss_masked"] is None and res["runs"][1]["last_train_loss_masked"] > 0
    loss = res["heldout_next_token_loss"]
    assert res["ratio_combined_over_next"] == loss["combined"] / loss["next"]
    assert "ratio combined / next" in stdout
