"""Run by tests/test_distributed.py in each spawned rank: join a gloo group, train, leave."""

from __future__ import annotations

import os
import sys


def train_rank(rank: int, world: int, port: int, overrides: list[str], resume: str | None, errors) -> None:
    import torch
    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    try:
        from worldloom.config import build_config
        from worldloom.train import train

        if resume:
            train(resume=resume, overrides=overrides, progress=False, log=lambda *a: None)
        else:
            train(build_config(None, overrides), progress=False, log=lambda *a: None)
        dist.barrier()
        dist.destroy_process_group()
    except BaseException as e:  # reported to the parent, which fails the test with it
        errors.put(f"rank {rank}: {type(e).__name__}: {e}")
        raise
    # Done and reported: leave without the interpreter's teardown, where a finished gloo group's
    # threads were seen (about once in two full-suite runs) to abort a rank ("terminate called
    # without an active exception") after its work was complete.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def collect_rank(rank: int, world: int, port: int, out: str, kwargs: dict, errors) -> None:
    """Collect with the seeds spread over ``world`` gloo ranks; each rank writes the seeds it played
    to ``out``.played-<rank> (rank 0 writes the dataset itself)."""
    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world))
    try:
        from worldloom.world.data import collect

        played = []
        real_run = collect._Collector.run

        def run(self, seeds):
            played.extend(seeds)
            return real_run(self, seeds)

        collect._Collector.run = run
        dist.init_process_group("gloo")
        meta = collect.collect_dataset(out, world=world, **kwargs)
        assert (meta != {}) == (rank == 0), f"rank {rank} returned {meta!r:.80}"
        with open(f"{out}.played-{rank}", "w") as f:
            f.write(" ".join(map(str, played)))
        dist.barrier()
        dist.destroy_process_group()
    except BaseException as e:
        errors.put(f"rank {rank}: {type(e).__name__}: {e}")
        raise
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)
