"""Smoke test of benchmarks/bench_align.py --quick: its stages are real `worldloom` commands (data instruct,
train, tune sft/prefs/dpo/ppo here; orpo, reward, full SFT and dpo+sft run the same way and have tests of
their own), evaluated by eval --tasks --baseline; the table is written; a second pass continues."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_bench_align_quick(tmp_path):
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "bench_align.py"), "--dir", str(tmp_path), "--quick",
                           "--skip", "dpo_rpo,sft_full,orpo,reward"],  # stages like the others (own tests: test_tune_recipes)
                          cwd=ROOT, capture_output=True, text=True, timeout=900)  # a hang guard
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    res = json.loads((tmp_path / "align.json").read_text())
    stages = res["stages"]
    assert set(stages) == {"data", "base", "sft", "prefs", "dpo", "ppo"}
    assert all(s["rc"] == 0 and s["seconds"] > 0 and s["peak_rss_mb"] > 50 for s in stages.values())
    ev = res["eval"]
    assert set(ev) == {"base", "sft", "dpo", "ppo"}
    assert ev["sft"]["baseline"]["win_rate"] == 0.5  # the SFT run against itself: all ties
    assert ev["sft"]["trained"] < ev["sft"]["params"]  # LoRA trains a few (full SFT: the memory pass below)
    assert res["prefs"]["prompts"] > 0
    assert "| dpo |" in proc.stdout
    again = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "bench_align.py"), "--dir", str(tmp_path), "--quick",
                            "--skip", "dpo_rpo,sft_full,orpo,reward,ppo", "--memory"], cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert again.returncode == 0 and again.stdout.count("done already") == 5 + 4  # an interrupted benchmark continues
    assert "worldloom eval" not in again.stdout  # stages and evaluations stored are not run again
    mem = json.loads((tmp_path / "align.json").read_text())["memory"]
    assert mem["lora"]["trained"] < mem["full"]["trained"] and mem["lora"]["peak_rss_mb"] > 50
