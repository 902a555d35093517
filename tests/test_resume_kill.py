"""A run killed (SIGKILL, no clean-up) at many points, during training and inside
save_checkpoint, then resumed, logs exactly the losses of the run that was never killed.

Each kill happens in a forked child (the same process image: no import cost), from inside:
just before or after a chosen call to a chosen function (writing the weights, the optimizer
state, state.json, the pointer, renaming a file into place, removing the older checkpoint,
appending a metrics row). The parent then does what a user would: ``--resume`` when the run
has a checkpoint, otherwise start it again.
"""

from __future__ import annotations

import os
import shutil
import signal
import time

import pytest
import torch

import worldloom.checkpoint as checkpoint_mod
import worldloom.train.loop as loop
from worldloom.checkpoint import latest_checkpoint
from worldloom.train import train

from test_train_resume import EXACT, QUIET, assert_same_run, train_rows

STEPS = 12  # checkpoints at 3, 6, 9, 12 (EXACT sets train.eval_interval=3)
COMMON = (*EXACT, "train.lr=0.01", "train.min_lr=0.001", f"train.max_steps={STEPS}")

# (module, function, which call, before/after): per checkpoint save_tensors is called twice
# (weights, optimizer), write_json twice (state.json, pointer), os.replace four times, and
# shutil.rmtree once per older checkpoint; _append once per step and once per evaluation.
KILLS = [
    (checkpoint_mod, "save_tensors", 1, "before"),  # during the first save: no checkpoint yet
    (checkpoint_mod, "write_json", 2, "before"),  # first folder renamed into place, pointer not yet written
    (checkpoint_mod, "save_tensors", 3, "before"),
    (checkpoint_mod, "save_tensors", 3, "after"),  # weights written, optimizer not
    (checkpoint_mod, "write_json", 3, "after"),  # state.json written, folder not renamed
    (checkpoint_mod, "write_json", 4, "before"),  # new folder in place, pointer still at the old one
    (checkpoint_mod, "write_json", 4, "after"),  # pointer moved, older folder not removed
    (os, "replace", 7, "before"),  # inside an atomic write: the temporary file exists
    (os, "replace", 8, "before"),  # ... of the pointer, beside the real one
    (shutil, "rmtree", 2, "before"),
    (loop, "_append", 9, "after"),  # between checkpoints
    (loop, "_append", 16, "after"),
]


def _kill_self():
    os.kill(os.getpid(), signal.SIGKILL)


def run_and_kill(cfg, module, name: str, n: int, when: str, timeout: float = 120.0) -> None:
    """Train `cfg` in a forked child that SIGKILLs itself at the n-th call of module.name."""
    pid = os.fork()
    if pid == 0:  # the child: never returns
        try:
            real, count = getattr(module, name), [0]

            def hooked(*a, **k):
                count[0] += 1
                if count[0] == n and when == "before":
                    _kill_self()
                out = real(*a, **k)
                if count[0] == n and when == "after":
                    _kill_self()
                return out

            setattr(module, name, hooked)
            train(cfg, **QUIET)
        finally:
            os._exit(3)  # reached only if the kill point never came
    deadline = time.monotonic() + timeout
    while True:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            break
        if time.monotonic() > deadline:
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
            pytest.fail(f"the child did not reach {name} call {n} within {timeout} s")
        time.sleep(0.02)
    assert os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL, f"child ended with status {status}"


@pytest.fixture(scope="module")
def reference(tmp_path_factory, corpus_file):
    from conftest import tiny_config

    torch.set_num_threads(1)
    cfg = tiny_config(corpus_file, tmp_path_factory.mktemp("ref"), "ref", *COMMON)
    assert train(cfg, **QUIET)["step"] == STEPS
    return cfg.run_dir


@pytest.mark.parametrize("module, name, n, when", KILLS, ids=[f"{k[1]}-{k[2]}-{k[3]}" for k in KILLS])
def test_killed_anywhere_and_resumed_is_bit_identical(reference, tiny_cfg, module, name, n, when):
    cfg = tiny_cfg(*COMMON, name="killed")
    run_and_kill(cfg, module, name, n, when)
    if latest_checkpoint(cfg.run_dir) is None:  # killed before the first checkpoint: start it again
        assert train(cfg, **QUIET)["step"] == STEPS
    else:
        assert train(resume=cfg.run_dir, **QUIET)["step"] == STEPS
    assert_same_run(reference, cfg.run_dir, STEPS)
    assert not list(cfg.run_dir.rglob("*.tmp")), "a temporary file of the killed save was left behind"


def test_the_kill_points_are_where_they_claim(tiny_cfg):
    """The table above counts calls right: a kill after the 4th write_json leaves the pointer at step 6."""
    cfg = tiny_cfg(*COMMON, name="probe")
    run_and_kill(cfg, checkpoint_mod, "write_json", 4, "after")
    assert latest_checkpoint(cfg.run_dir).name == "step-00000006"
    assert train_rows(cfg.run_dir)[-1][0] == 6


def test_with_a_wall_clock_budget_resume_replays_the_schedule_until_the_next_checkpoint(tiny_cfg):
    """Once train.max_minutes binds, the learning rate follows the clock, so no two runs are
    bit-identical. A resumed run must still replay exactly what the killed one did after its
    last checkpoint: the schedule between checkpoints depends only on what the checkpoint saved."""
    cfg = tiny_cfg(*EXACT, "train.lr=0.01", "train.min_lr=0.001", "train.max_steps=1000000", "train.max_minutes=0.05",
                   name="clock")
    run_and_kill(cfg, loop, "_append", 10, "after")  # rows: steps 1-3, val 3, 4-6, val 6, steps 7, 8
    killed = train_rows(cfg.run_dir)
    assert [r[0] for r in killed] == list(range(1, 9)) and latest_checkpoint(cfg.run_dir).name == "step-00000006"
    assert train(resume=cfg.run_dir, **QUIET)["step"] > 8
    resumed = train_rows(cfg.run_dir)
    assert resumed[:8] == killed  # the same losses and learning rates, bit for bit, after the checkpoint too
    lrs = [r[2] for r in resumed]
    assert lrs[-1] < lrs[8] < lrs[3]  # and the schedule still decays with the clock
