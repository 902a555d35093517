"""Training on PyTorch's own distributed engine: one rank of a torchrun job, or the only process.

    torchrun --nproc-per-node 2 -m worldloom train shakespeare-char data.path=input.txt train.dist=ddp

- ``init(kind, device)``: joins the process group torchrun describes in the environment
  (``RANK``, ``WORLD_SIZE``, ``MASTER_ADDR``...), gloo on CPU and NCCL on GPU; returns ``Dist``.
- ``wrap(model, kind, dist, device)``: ``DistributedDataParallel``, or FSDP2 ``fully_shard`` per
  block and at the root over an explicit 1-D device mesh (a CPU mesh on CPU).
- ``shard_rows(batch, dist)``: every rank draws the same global batch from the same generator
  and keeps its own rows (``shard_sequence``: its block of every sequence, for ring attention), so the global batch, the data order and the saved data RNG state are
  those of one process, whatever the world size; ``loss_scale`` makes the ranks' mean gradient
  the gradient of the global (weighted) mean loss.
- ``full_model_state`` / ``full_optimizer_state``: the whole model and optimizer state gathered
  (collective: every rank calls) into the single-process checkpoint format, so a checkpoint
  written by N ranks resumes on M ranks or one process, and `generate`/`eval` load it as usual.

Only rank 0 (``Dist.main``) logs and writes the run folder.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as torch_dist

from ..errors import ConfigError


@dataclass(frozen=True)
class Dist:
    rank: int = 0
    world: int = 1
    kind: str = "none"  # none | ddp | fsdp

    @property
    def main(self) -> bool:
        """Whether this process writes the run folder and talks to the user."""
        return self.rank == 0

    @property
    def sharded(self) -> bool:
        return self.world > 1 and self.kind == "fsdp"


def env_world_size() -> int:
    try:
        return int(os.environ.get("WORLD_SIZE", "1"))
    except ValueError:
        return 1


def init(kind: str, device: torch.device) -> Dist:
    """Join torchrun's process group (or the one already initialised); a single process otherwise."""
    world = torch_dist.get_world_size() if torch_dist.is_initialized() else env_world_size()
    if world <= 1:
        return Dist(kind=kind)
    if kind == "none":
        raise ConfigError(f"this process is one of {world} ranks (torchrun): set train.dist=ddp or train.dist=fsdp")
    if not torch_dist.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        if device.type == "cuda":
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        torch_dist.init_process_group(backend)
    return Dist(torch_dist.get_rank(), torch_dist.get_world_size(), kind)


def agree(choice: str, options: tuple[str, ...], dist: Dist) -> str:
    """Rank 0's choice among ``options`` on every rank (e.g. the precision ``auto`` measured)."""
    if dist.world <= 1:
        return choice
    t = torch.tensor([options.index(choice)])
    torch_dist.broadcast(t, src=0)
    return options[int(t.item())]


def peer_failed(error: BaseException) -> bool:
    """Whether an error is a collective broken because another rank of the job exited."""
    return torch_dist.is_available() and torch_dist.is_initialized() and "closed by peer" in str(error)


def barrier(dist: Dist) -> None:
    """Wait for every rank (e.g. while rank 0 collects the data all ranks train on)."""
    if dist.world > 1:
        torch_dist.barrier()


def wrap(model: torch.nn.Module, dist: Dist, device: torch.device) -> torch.nn.Module:
    """The module a training step calls: the model itself (one process), DDP around it, or the model
    sharded in place by FSDP2 (each block, then the root: embeddings, final norm, head)."""
    if dist.world <= 1:
        return model
    if dist.kind == "ddp":
        from torch.nn.parallel import DistributedDataParallel

        return DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    mesh = init_device_mesh(device.type, (dist.world,))
    for block in getattr(model.backbone, "blocks", []):
        fully_shard(block, mesh=mesh)
    fully_shard(model, mesh=mesh)
    return model


def shard_rows(batch: dict, dist: Dist) -> dict:
    """This rank's rows of a global batch, plus ``loss_scale`` (see the module docs).

    Tensors with the batch's leading size are sliced; a world batch's frame targets
    (``frame_index``: flattened b * T + t positions, ``frame_target``: one row each) follow
    their rows; anything else (e.g. a scalar weight) is kept whole."""
    if dist.world <= 1:
        return batch
    B, T = batch["input"].shape
    lo, hi = _span(B, dist, f"train.batch_size={B}")
    out = _shard(batch, dist, lambda v: v[lo:hi], lambda b, t: (b >= lo) & (b < hi), lambda b, t: (b - lo) * T + t)
    if "prefix_views" in batch:  # a talk batch's vision-prefix images follow their rows (row-major placeholder order)
        views, at = batch["prefix_views"], batch["prefix_at"]
        per_row = at.sum(1) // max(int(at.sum()) // max(len(views), 1), 1)  # (B,) views placed in each row
        out["prefix_views"] = views[int(per_row[:lo].sum()) : int(per_row[:hi].sum())]
    return out


def shard_sequence(batch: dict, dist: Dist) -> dict:
    """This rank's block of every sequence (tokens rank*T/N .. (rank+1)*T/N - 1 of each row, targets
    already shifted over the whole window), for ring attention; ``loss_scale`` as in shard_rows."""
    if dist.world <= 1:
        return batch
    B, T = batch["input"].shape
    if "prefix_views" in batch:
        raise ConfigError("a vision prefix (talk.view=prefix) cannot be split along the sequence by ring attention; "
                          "use train.dist=ddp or fsdp with model.attention=flash")
    lo, hi = _span(T, dist, f"model.context={T} (model.attention=ring)")
    return _shard(batch, dist, lambda v: v[:, lo:hi], lambda b, t: (t >= lo) & (t < hi), lambda b, t: b * (hi - lo) + t - lo)


def _span(n: int, dist: Dist, what: str) -> tuple[int, int]:
    """[lo, hi) of this rank's equal share of n (ConfigError naming ``what`` unless the ranks divide n)."""
    if n % dist.world:
        raise ConfigError(f"{what} must be divisible by the number of ranks ({dist.world})")
    return dist.rank * n // dist.world, (dist.rank + 1) * n // dist.world


def _shard(batch: dict, dist: Dist, take, keep_frame, frame_pos) -> dict:
    """Apply ``take`` to every (B, T, ...) tensor of the batch; keep the frame targets whose (row, position)
    ``keep_frame`` accepts, renumbered by ``frame_pos``; add ``loss_scale``."""
    B, T = batch["input"].shape
    out = {k: take(v) if torch.is_tensor(v) and v.ndim >= 2 and v.shape[:2] == (B, T) else v
           for k, v in batch.items() if k not in ("frame_index", "frame_target", "prefix_views")}
    if "frame_index" in batch:
        b, t = batch["frame_index"] // T, batch["frame_index"] % T
        keep = keep_frame(b, t)
        out["frame_index"] = frame_pos(b[keep], t[keep])
        out["frame_target"] = batch["frame_target"][keep]
    weight = batch.get("weight")
    share = take(weight).sum() / weight.sum().clamp(min=1e-8) if weight is not None else torch.tensor(1.0 / dist.world)
    out["loss_scale"] = share * dist.world  # the ranks' mean of scaled losses = the global weighted mean
    return out


def all_mean(value: float, dist: Dist) -> float:
    """The mean over ranks of a float (for the logged training loss)."""
    if dist.world <= 1:
        return value
    t = torch.tensor([value], dtype=torch.float64)
    torch_dist.all_reduce(t)
    return float(t.item()) / dist.world


def _full(t: torch.Tensor) -> torch.Tensor:
    from torch.distributed.tensor import DTensor

    return t.full_tensor() if isinstance(t, DTensor) else t


def full_model_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """name -> whole tensor on CPU, each shared (tied) parameter once. Collective under FSDP."""
    seen, out = set(), {}
    for name, t in model.state_dict(keep_vars=True).items():
        if id(t) in seen:
            continue
        seen.add(id(t))
        out[name] = _full(t.detach()).cpu()
    return out


def full_optimizer_state(optimizer: torch.optim.Optimizer) -> dict:
    """optimizer.state_dict() with every sharded state tensor gathered whole. Collective under FSDP."""
    sd = optimizer.state_dict()
    sd["state"] = {i: {k: _full(v).cpu() if torch.is_tensor(v) else v for k, v in st.items()} for i, st in sd["state"].items()}
    return sd


def shard_optimizer_state(optimizer: torch.optim.Optimizer, sd: dict) -> dict:
    """A whole (single-process) optimizer state made to fit sharded parameters: each state tensor of a
    DTensor parameter's shape is distributed like its parameter."""
    from torch.distributed.tensor import DTensor, distribute_tensor

    params = [p for g in optimizer.param_groups for p in g["params"]]
    for i, st in sd["state"].items():
        p = params[int(i)]
        if isinstance(p, DTensor):
            for k, v in st.items():
                if torch.is_tensor(v) and v.shape == p.shape:
                    st[k] = distribute_tensor(v.to(p.dtype), p.device_mesh, p.placements)
    return sd
