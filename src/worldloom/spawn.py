"""Run one function on N local processes joined in a gloo process group (tests, benchmarks).

``spawn_gloo(fn, world, *args)`` starts ``world`` fresh interpreters (start method ``spawn``,
so nothing of the parent's torch state is inherited), joins them in a gloo group over
127.0.0.1 on a free port, calls ``fn(rank, world, *args)`` in each, tears the group down and
returns when all have finished; a worker's exception fails the call in the parent. ``fn`` must
be importable by name (a module-level function). Results come back through files the
workers write (e.g. safetensors under a temporary folder), never through pickles.

Under ``torchrun`` this is not needed: torchrun starts the processes and sets the same
environment (MASTER_ADDR, MASTER_PORT, RANK, WORLD_SIZE).
"""

from __future__ import annotations

import os
import socket
from datetime import timedelta

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago (bind to port 0, read it, close)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _entry(rank: int, fn, world: int, port: int, threads: int, timeout_s: float, args: tuple) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world))
    torch.set_num_threads(threads)
    dist.init_process_group("gloo", rank=rank, world_size=world, timeout=timedelta(seconds=timeout_s))
    try:
        fn(rank, world, *args)
    finally:
        dist.destroy_process_group()


def spawn_gloo(fn, world: int, *args, threads: int = 1, timeout_s: float = 120.0) -> None:
    """Call ``fn(rank, world, *args)`` on ``world`` spawned processes in one gloo group
    (``threads`` torch threads each: 1 keeps small workers from stalling each other). A
    collective or point-to-point operation that waits longer than ``timeout_s`` fails its
    worker (and so this call) instead of hanging."""
    args = (fn, world, free_port(), threads, timeout_s, args)
    mp.start_processes(_entry, args=args, nprocs=world, start_method="spawn")
