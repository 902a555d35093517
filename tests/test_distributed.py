"""Scale-out on PyTorch's own engine: 2 gloo ranks (DDP and FSDP2) train exactly like one process
with the same global batch, and checkpoints move between world sizes."""

from __future__ import annotations

import json

import pytest
import torch
import torch.multiprocessing as mp

from worldloom.spawn import free_port
from worldloom.train import train

from conftest import TINY as TINY_ARGS
from conftest import tiny_config
from dist_worker import train_rank

QUIET = dict(progress=False, log=lambda *a: None)
STEPS = 6
COMMON = ("train.batch_size=4", "train.log_interval=1", "train.eval_interval=3", "train.lr=0.01", "train.min_lr=0.001",
          "train.warmup_steps=1")



def run_ranks(world: int, overrides: list[str], resume=None) -> None:
    ctx = mp.get_context("spawn")
    errors = ctx.SimpleQueue()
    mp.start_processes(train_rank, args=(world, free_port(), list(overrides), resume, errors), nprocs=world, join=True,
                       start_method="spawn")
    assert errors.empty(), errors.get()


def rows(run_dir, key: str) -> list[tuple]:
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return [(r["step"], r[key]) for r in map(json.loads, lines) if key in r]


def close(a: list[tuple], b: list[tuple], rel: float = 1e-5) -> None:
    assert [s for s, _ in a] == [s for s, _ in b]
    for (s, x), (_, y) in zip(a, b):
        assert abs(x - y) <= rel * abs(y), (s, x, y)


@pytest.mark.parametrize("kind", ["ddp", "fsdp"])
def test_two_ranks_train_like_one_process(corpus_file, tmp_path, kind):
    single = tiny_config(corpus_file, tmp_path, "single", *COMMON, f"train.max_steps={STEPS}")
    train(single, **QUIET)
    two = tiny_config(corpus_file, tmp_path, "two", *COMMON, f"train.max_steps={STEPS}", f"train.dist={kind}")
    run_ranks(2, [f"data.path={corpus_file}", f"out_dir={tmp_path}", "name=two", *TINY_ARGS, *COMMON,
                  f"train.max_steps={STEPS}", f"train.dist={kind}"])
    assert {r for _, r in rows(two.run_dir, "ranks")} == {2}  # really two ranks
    close(rows(two.run_dir, "loss"), rows(single.run_dir, "loss"))  # every step's global-batch loss
    close(rows(two.run_dir, "val_loss"), rows(single.run_dir, "val_loss"))
    from worldloom.io import load_tensors
    from worldloom.checkpoint import latest_checkpoint

    a = load_tensors(latest_checkpoint(two.run_dir) / "model.safetensors")
    b = load_tensors(latest_checkpoint(single.run_dir) / "model.safetensors")
    assert a.keys() == b.keys()  # the same single-process format, gathered whole
    for k in a:
        torch.testing.assert_close(a[k], b[k], atol=1e-5, rtol=1e-4)


def test_ring_attention_training_equals_one_process(corpus_file, tmp_path):
    """model.attention=ring: two ranks each hold half of every sequence; the losses are those of one process."""
    single = tiny_config(corpus_file, tmp_path, "full", *COMMON, f"train.max_steps={STEPS}")
    train(single, **QUIET)
    run_ranks(2, [f"data.path={corpus_file}", f"out_dir={tmp_path}", "name=ring", *TINY_ARGS, *COMMON,
                  f"train.max_steps={STEPS}", "train.dist=ddp", "model.attention=ring"])
    ring = tmp_path / "ring"
    assert {r for _, r in rows(ring, "ranks")} == {2}
    close(rows(ring, "loss"), rows(single.run_dir, "loss"))
    close(rows(ring, "val_loss"), rows(single.run_dir, "val_loss"))


def test_ring_attention_config_is_checked():
    from worldloom.config import build_config
    from worldloom.errors import ConfigError

    with pytest.raises(ConfigError, match="attention layers only"):
        build_config(None, ["model.attention=ring", "model.backbone=mamba"])
    with pytest.raises(ConfigError, match="sdpa or ring"):
        build_config(None, ["model.attention=flash"])


@pytest.mark.parametrize("kind,first,then", [("fsdp", 2, 1), ("ddp", 1, 2)])
def test_checkpoint_moves_between_world_sizes(corpus_file, tmp_path, kind, first, then):
    """A run stopped at step 3 by `first` ranks and resumed by `then` continues the uninterrupted loss sequence."""
    ref = tiny_config(corpus_file, tmp_path, "ref", *COMMON, f"train.max_steps={STEPS}", "train.lr=0.003", "train.min_lr=0.003")
    train(ref, **QUIET)
    args = [f"data.path={corpus_file}", f"out_dir={tmp_path}", "name=moved", *TINY_ARGS, *COMMON, "train.max_steps=3",
            "train.lr=0.003", "train.min_lr=0.003", f"train.dist={kind}"]  # constant lr: stopping at 3 changes no step's lr
    run_dir = tmp_path / "moved"
    launch(first, args)
    launch(then, [f"train.max_steps={STEPS}"], resume=str(run_dir))
    close(rows(run_dir, "loss"), rows(ref.run_dir, "loss"))
    close(rows(run_dir, "val_loss"), rows(ref.run_dir, "val_loss"))


def launch(world: int, overrides: list[str], resume=None) -> None:
    if world > 1:
        run_ranks(world, overrides, resume)
    elif resume:
        train(resume=resume, overrides=overrides, **QUIET)
    else:
        from worldloom.config import build_config

        train(build_config(None, overrides), **QUIET)


def test_shard_rows_splits_the_global_batch():
    from worldloom.train.dist import Dist, shard_rows

    B, T = 4, 5
    batch = {"input": torch.arange(B * T).view(B, T), "target": torch.arange(B * T).view(B, T) + 1,
             "weight": torch.tensor([[1.0] * T, [0.0] * T, [1.0] * T, [2.0] * T]),
             "frame_index": torch.tensor([3, 7, 12, 18]), "frame_target": torch.tensor([[30], [70], [120], [180]]),
             "frame_weight": torch.tensor(0.5)}
    halves = [shard_rows(batch, Dist(r, 2, "ddp")) for r in range(2)]
    assert torch.equal(torch.cat([h["input"] for h in halves]), batch["input"])
    assert halves[0]["frame_index"].tolist() == [3, 7] and halves[1]["frame_index"].tolist() == [2, 8]  # b*T+t, local rows
    assert halves[1]["frame_target"].tolist() == [[120], [180]] and halves[1]["frame_weight"] == 0.5
    # loss_scale: rank r's weighted mean times its scale, averaged over ranks, is the global weighted mean
    assert [float(h["loss_scale"]) for h in halves] == pytest.approx([2 * 5 / 20, 2 * 15 / 20])
    with pytest.raises(Exception, match="divisible"):
        shard_rows(batch, Dist(0, 3, "ddp"))


def test_shard_rows_gives_each_rank_the_prefix_images_of_its_rows():
    """A talk batch with a vision prefix (2 vectors per view): row 0 holds one view, row 1 none, rows 2-3 two and one."""
    from worldloom.train.dist import Dist, shard_rows, shard_sequence

    B, T = 4, 6
    at = torch.zeros(B, T, dtype=torch.bool)
    at[0, 1:3] = at[2, 0:2] = at[2, 3:5] = at[3, 4:6] = True
    views = torch.arange(4).view(4, 1, 1, 1).expand(4, 2, 2, 3)  # view i is filled with i
    batch = {"input": torch.zeros(B, T, dtype=torch.long), "prefix_at": at, "prefix_views": views}
    halves = [shard_rows(batch, Dist(r, 2, "ddp")) for r in range(2)]
    assert [h["prefix_views"][:, 0, 0, 0].tolist() for h in halves] == [[0], [1, 2, 3]]
    assert all(int(h["prefix_at"].sum()) == 2 * len(h["prefix_views"]) for h in halves)
    with pytest.raises(Exception, match="ring attention"):
        shard_sequence(batch, Dist(0, 2, "ddp"))


def test_torchrun_launches_the_cli(corpus_file, tmp_path):
    """The documented command: torchrun --nproc-per-node 2 -m worldloom train ... train.dist=ddp."""
    import os
    import subprocess
    import sys

    torchrun = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port", str(free_port())]
    args = ["-m", "worldloom", "train", "shakespeare-char", "--no-progress", f"data.path={corpus_file}", f"out_dir={tmp_path}", "name=tr",
            *TINY_ARGS, *COMMON, "train.max_steps=3", "train.dist=ddp"]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    res = subprocess.run(torchrun + args, capture_output=True, text=True, timeout=300, env=env)
    assert res.returncode == 0, res.stderr[-2000:]
    assert {r for _, r in rows(tmp_path / "tr", "ranks")} == {2}
    assert res.stdout.count("done: step 3") == 1  # rank 0 talks, rank 1 does not


def test_torchrun_rank_without_dist_is_one_line(corpus_file, tmp_path, monkeypatch):
    from worldloom.errors import ConfigError

    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(ConfigError, match="set train.dist=ddp or train.dist=fsdp"):
        train(tiny_config(corpus_file, tmp_path, "x"), **QUIET)
