"""Training: the loss goes down, run folders are complete, and a resumed run is bit-identical."""

from __future__ import annotations

import json

import pytest
import torch
from hypothesis import assume, given
from hypothesis import strategies as st

import worldloom.train.loop as loop
from worldloom.data.text import TextData, split_text
from worldloom.errors import CheckpointError, ConfigError, DataError
from worldloom.io import load_tensors
from worldloom.train import train
from worldloom.checkpoint import latest_checkpoint

from conftest import TRAINED_STEPS

N = 6  # steps before the interruption; the full run is 2N
QUIET = dict(progress=False, log=lambda *a: None)
# dropout > 0 so the torch RNG state matters; grad_accum 2 so micro-batches are drawn in order
EXACT = ("model.dropout=0.2", "train.grad_accum=2", "train.eval_interval=3", "train.log_interval=1")


def metrics(run_dir) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]


def train_rows(run_dir) -> list[tuple]:
    return [(r["step"], r["loss"], r["lr"]) for r in metrics(run_dir) if "loss" in r]


def val_rows(run_dir) -> list[tuple]:
    return [(r["step"], r["val_loss"]) for r in metrics(run_dir) if "val_loss" in r]


def weights(run_dir) -> dict[str, torch.Tensor]:
    return load_tensors(latest_checkpoint(run_dir) / "model.safetensors")


def assert_same_run(a, b, steps: int) -> None:
    rows_a, rows_b = train_rows(a), train_rows(b)
    assert [r[0] for r in rows_a] == list(range(1, steps + 1))
    assert rows_b == rows_a  # every per-step loss and learning rate, exactly
    assert val_rows(b) == val_rows(a)
    wa, wb = weights(a), weights(b)
    assert wa.keys() == wb.keys()
    for k in wa:
        assert torch.equal(wa[k], wb[k]), k
    oa = load_tensors(latest_checkpoint(a) / "optimizer.safetensors")
    ob = load_tensors(latest_checkpoint(b) / "optimizer.safetensors")
    assert oa.keys() == ob.keys() and all(torch.equal(oa[k], ob[k]) for k in oa)


def test_resume_with_longer_budget_is_bit_identical(tiny_cfg):
    # a constant learning rate after warmup, so stopping at N and extending to 2N changes no step's lr
    common = (*EXACT, "train.lr=0.003", "train.min_lr=0.003")
    a = tiny_cfg(*common, f"train.max_steps={2 * N}", name="a")
    b = tiny_cfg(*common, f"train.max_steps={N}", name="b")
    assert train(a, **QUIET)["step"] == 2 * N
    assert train(b, **QUIET)["step"] == N
    assert latest_checkpoint(b.run_dir).name == f"step-{N:08d}"
    summary = train(resume=b.run_dir, overrides=[f"train.max_steps={2 * N}"], **QUIET)
    assert summary["step"] == 2 * N
    assert_same_run(a.run_dir, b.run_dir, 2 * N)


def test_resume_after_kill_is_bit_identical(tiny_cfg, monkeypatch):
    common = (*EXACT, "train.lr=0.01", "train.min_lr=0.001", f"train.max_steps={2 * N}")  # a real cosine decay
    a = tiny_cfg(*common, name="a")
    b = tiny_cfg(*common, name="b")
    train(a, **QUIET)

    real_append = loop._append

    def append_then_die(path, row):
        real_append(path, row)
        if row.get("step") == N + 2 and "loss" in row:
            raise KeyboardInterrupt  # Ctrl-C two steps after the checkpoint at step N

    monkeypatch.setattr(loop, "_append", append_then_die)
    with pytest.raises(CheckpointError, match=f"interrupted at step {N + 2}"):
        train(b, **QUIET)
    monkeypatch.undo()
    assert latest_checkpoint(b.run_dir).name == f"step-{N:08d}"
    assert train_rows(b.run_dir)[-1][0] == N + 2  # rows after the checkpoint exist and must be dropped

    assert train(resume=b.run_dir, **QUIET)["step"] == 2 * N
    assert_same_run(a.run_dir, b.run_dir, 2 * N)


def test_resume_of_a_finished_run_does_nothing(tiny_cfg):
    cfg = tiny_cfg()
    train(cfg, **QUIET)
    before = (cfg.run_dir / "metrics.jsonl").read_text()
    w = weights(cfg.run_dir)
    assert train(resume=cfg.run_dir, **QUIET)["step"] == cfg.train.max_steps
    assert (cfg.run_dir / "metrics.jsonl").read_text() == before
    assert all(torch.equal(w[k], v) for k, v in weights(cfg.run_dir).items())


def test_resume_refuses_non_train_overrides(tiny_cfg):
    cfg = tiny_cfg()
    train(cfg, **QUIET)
    with pytest.raises(ConfigError, match="only train"):
        train(resume=cfg.run_dir, overrides=["model.n_layer=2"], **QUIET)


def test_loss_decreases_on_learnable_corpus(trained_run):
    rows = train_rows(trained_run)
    assert len(rows) == TRAINED_STEPS
    first = rows[0][1]
    last = sum(r[1] for r in rows[-10:]) / 10
    assert first > 4.0  # about log(vocab) at initialisation
    assert last < first - 2.0, (first, last)
    vals = val_rows(trained_run)
    assert [s for s, _ in vals] == [40, 80]
    assert vals[-1][1] < vals[0][1] < first - 1.0


def test_run_folder_contents(trained_run):
    assert (trained_run / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert (trained_run / "config.yaml").is_file()
    assert (trained_run / "tokenizer" / "tokenizer.json").is_file()
    ckpt = latest_checkpoint(trained_run)
    assert ckpt.name == f"step-{TRAINED_STEPS:08d}"
    assert {p.name for p in ckpt.iterdir()} == {"model.safetensors", "optimizer.safetensors", "state.json"}
    # one checkpoint kept, no temporary leftovers
    assert [p.name for p in (trained_run / "checkpoints").iterdir()] == [ckpt.name]
    assert not [p for p in trained_run.rglob("*.tmp")]
    state = json.loads((ckpt / "state.json").read_text())
    assert state["step"] == TRAINED_STEPS and state["precision"] == "fp32"
    for row in metrics(trained_run):
        assert "step" in row and "elapsed" in row


def test_training_into_existing_run_folder_without_resume_errors(tiny_cfg):
    cfg = tiny_cfg()
    train(cfg, **QUIET)
    before = (cfg.run_dir / "metrics.jsonl").read_text()
    with pytest.raises(ConfigError) as e:
        train(tiny_cfg(), **QUIET)
    msg = str(e.value)
    assert "\n" not in msg and "--resume" in msg and str(cfg.run_dir) in msg
    assert (cfg.run_dir / "metrics.jsonl").read_text() == before  # nothing was touched


def test_wall_clock_budget_stops_training(tiny_cfg):
    cfg = tiny_cfg("train.max_steps=100000", "train.max_minutes=0.002", "train.eval_interval=100000")
    summary = train(cfg, **QUIET)
    assert 0 < summary["step"] < 100000
    assert latest_checkpoint(cfg.run_dir).name == f"step-{summary['step']:08d}"  # a final checkpoint
    lrs = [r[2] for r in train_rows(cfg.run_dir)]
    assert lrs[-1] < cfg.train.lr  # the schedule followed the time budget


def test_same_seed_same_run_different_seed_different_run(tiny_cfg):
    a = train_rows(_run(tiny_cfg, "a", "model.dropout=0.1"))
    b = train_rows(_run(tiny_cfg, "b", "model.dropout=0.1"))
    c = train_rows(_run(tiny_cfg, "c", "model.dropout=0.1", "train.seed=7"))
    assert a == b
    assert a != c


def _run(tiny_cfg, name, *overrides):
    cfg = tiny_cfg(*overrides, "train.max_steps=4", name=name)
    train(cfg, **QUIET)
    return cfg.run_dir


def test_resume_when_the_corpus_is_gone(tiny_cfg, tmp_path, corpus_text):
    data = tmp_path / "mine.txt"
    data.write_text(corpus_text)
    cfg = tiny_cfg(data=data)
    train(cfg, **QUIET)
    data.unlink()
    with pytest.raises(DataError, match="not found"):
        train(resume=cfg.run_dir, overrides=["train.max_steps=10"], **QUIET)


# ---------------------------------------------------------------- the data windows behind training and eval


@given(n=st.integers(2, 200), context=st.integers(1, 40), batch_size=st.integers(1, 7))
def test_windows_score_every_target_once(n, context, batch_size):
    assume(n >= context + 1)  # shorter corpora are refused before this (DataError)
    ids = torch.arange(n)
    data = TextData(ids, ids, n)
    seen = torch.zeros(n, dtype=torch.long)
    for b in data.windows("val", context, batch_size):
        assert b["input"].shape == b["target"].shape == b["weight"].shape
        assert b["input"].shape[0] <= batch_size and b["input"].shape[1] == context
        assert torch.equal(b["target"], b["input"] + 1)  # the next token of every input
        seen.index_add_(0, b["target"][b["weight"] > 0], torch.ones_like(b["target"][b["weight"] > 0]))
    assert seen[0] == 0 and bool((seen[1:] == 1).all())  # every target exactly once


def test_training_batches_are_next_token_windows():
    ids = torch.arange(100)
    data = TextData(ids, ids[:50], 50)
    g = torch.Generator().manual_seed(0)
    b = data.batch("train", 8, 16, g)
    assert b["input"].shape == (8, 16)
    assert torch.equal(b["target"], b["input"] + 1)
    assert torch.equal(b["input"][:, 1:], b["input"][:, :-1] + 1)  # contiguous windows
    assert int(data.batch("val", 64, 16, g)["target"].max()) < 50


def test_held_out_split_is_the_end_of_the_file():
    train_text, val_text = split_text("abcdefghij", 0.2)
    assert (train_text, val_text) == ("abcdefgh", "ij")
