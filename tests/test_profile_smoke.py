"""benchmarks/profile_train.py: the --quick run end to end, and the bucket rules on a small profile."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("transformers")

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "profile_train.py"
MUST_SHOW = ("matmul", "attention (sdpa)", "rotary", "norm", "swiglu (non-matmul)", "loss", "optimizer")


def test_profile_train_quick(tmp_path):
    out = tmp_path / "profile.json"
    proc = subprocess.run([sys.executable, str(SCRIPT), "--quick", "--json", str(out), "--top", "10"],
                          cwd=ROOT, capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    res = json.loads(out.read_text())
    assert res["quick"] is True and res["precision"] == "bf16"
    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        from profile_train import BUCKETS
    finally:
        sys.path.remove(str(ROOT / "benchmarks"))
    assert set(res["models"]) == {"worldloom", "llama"}
    for name, m in res["models"].items():
        b = m["buckets"]
        assert list(b) == BUCKETS
        step = m["step_ms_profiled"]
        assert step > 0 and m["step_ms_plain"] > 0
        total = sum(v["ms_per_step"] for v in b.values())
        assert total == pytest.approx(step, rel=0.01, abs=0.05), name  # unaccounted closes the sum
        ops = total - b["unaccounted"]["ms_per_step"]
        assert 0.5 * step <= ops <= 1.05 * step, (name, ops, step)  # the ops cover the step
        assert sum(v["pct"] for v in b.values()) == pytest.approx(100.0, abs=0.5)
        for key in MUST_SHOW:  # each part of the step was found (ranges, names and backward links work)
            assert b[key]["ms_per_step"] > 0, (name, key)
        assert 1 <= len(m["top_ops"]) <= 10
        selfs = [r["self_ms_per_step"] for r in m["top_ops"]]
        assert selfs == sorted(selfs, reverse=True) and any(r["op"] == "aten::mm" for r in m["top_ops"])
    for key in BUCKETS:
        assert key in proc.stdout
    assert "top 10 ops by self CPU time: worldloom" in proc.stdout and "top 10 ops by self CPU time: llama" in proc.stdout


def test_backward_inherits_forward_ranges():
    """The backward of ops run inside a labelled range counts in that range's bucket; a matmul is a
    matmul wherever it runs; optimizer phases take everything."""
    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        from profile_train import _contexts, bucket_of
    finally:
        sys.path.remove(str(ROOT / "benchmarks"))
    from torch.profiler import ProfilerActivity, profile, record_function

    x = torch.randn(8, 16, requires_grad=True)
    w = torch.randn(16, 16, requires_grad=True)
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        with record_function("forward"):
            with record_function("norm"):
                y = torch.nn.functional.rms_norm(x @ w, (16,))
            with record_function("rotary"):
                z = torch.cat((-y[:, 8:], y[:, :8]), dim=-1) * 0.5
        with record_function("loss"):
            loss = z.float().pow(2).mean()
        with record_function("backward"):
            loss.backward()
        with record_function("optimizer"):
            with torch.no_grad():
                torch._foreach_add_([w], [w.grad])
    events = prof.events()
    ctx = _contexts(events)
    got: dict = {}  # autograd node -> buckets of its bookkeeping events
    for e in events:
        if ctx[e.id][0] == "backward" and e.name.startswith("autograd::engine::evaluate_function:"):
            got.setdefault(e.name.split(": ")[1], set()).add(bucket_of(e.name, *ctx[e.id]))
    assert got["MmBackward0"] == {"norm"}  # the node's bookkeeping goes with its range...
    assert got["CatBackward0"] == {"rotary"} and got["NegBackward0"] == {"rotary"}
    assert got["MeanBackward0"] == {"loss"} and got["RsqrtBackward0"] == {"norm"}
    assert got["PowBackward0"] == {"loss", "norm"}  # one pow in each range
    mm = [bucket_of(e.name, *ctx[e.id]) for e in events if e.name == "aten::mm"]
    assert len(mm) == 3 and set(mm) == {"matmul"}  # ...but the mm kernels forward and backward are matmuls
    foreach = [bucket_of(e.name, *ctx[e.id]) for e in events if e.name.startswith("aten::_foreach")]
    assert foreach and set(foreach) == {"optimizer"}
