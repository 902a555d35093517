"""Which process this is: one rank of a torchrun job, or the only one.

Every training recipe runs unchanged on one process; under torchrun each process is one rank
and only rank 0 logs, writes metrics, plots and checkpoints (``Dist.main``).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch.distributed as torch_dist


@dataclass(frozen=True)
class Dist:
    rank: int = 0
    world: int = 1

    @property
    def main(self) -> bool:
        """Whether this process writes the run folder and talks to the user."""
        return self.rank == 0


def current() -> Dist:
    """The process group this process belongs to (a single process when none is initialised)."""
    if torch_dist.is_available() and torch_dist.is_initialized():
        return Dist(torch_dist.get_rank(), torch_dist.get_world_size())
    return Dist()
