"""Checkpoints that survive a kill at any instant.

Layout inside a run folder::

    checkpoints/step-00000500/model.safetensors      weights
    checkpoints/step-00000500/optimizer.safetensors  AdamW moments and step counts
    checkpoints/step-00000500/state.json             step, elapsed time, RNG states, precision
    checkpoint.json                                  {"latest": "checkpoints/step-00000500"}

A checkpoint folder is written under a temporary name and renamed when complete; only
then is ``checkpoint.json`` replaced (atomically) to point at it, and only after that are
older folders removed. Whatever instant a run dies at, ``checkpoint.json`` names a whole
checkpoint. Loading reads safetensors and JSON only: no file is ever unpickled.
"""

from __future__ import annotations

import base64
import re
import shutil
from pathlib import Path

import torch

from .errors import CheckpointError
from .io import load_tensors, read_json, remove_stale_temporaries, save_tensors, write_json

FORMAT = "worldloom-checkpoint/1"
POINTER = "checkpoint.json"


CHECKPOINTS = "checkpoints"
_NAME = re.compile(r"step-\d{8,}")


def latest_checkpoint(run_dir: Path) -> Path | None:
    """The checkpoint folder that checkpoint.json names, or None for a run without one.

    The pointer must name a folder directly inside the run's own checkpoints/ (never one of
    another run, never a path outside the run folder)."""
    run_dir = Path(run_dir)
    if run_dir.exists() and not run_dir.is_dir():
        raise CheckpointError(f"run folder {run_dir} exists but is a file, not a folder; choose another name= or out_dir=")
    if not (run_dir / POINTER).exists():
        return None
    ptr = read_json(run_dir / POINTER, "checkpoint pointer")
    latest = ptr.get("latest")
    parts = str(latest).split("/")
    if not isinstance(latest, str) or len(parts) != 2 or parts[0] != CHECKPOINTS or not _NAME.fullmatch(parts[1]):
        raise CheckpointError(f"{run_dir / POINTER} is corrupt: 'latest' must be {CHECKPOINTS}/step-NNNNNNNN, got {latest!r}")
    path = run_dir / latest
    inside = (run_dir / CHECKPOINTS).resolve()
    if (run_dir / CHECKPOINTS).is_symlink() or path.is_symlink() or path.resolve().parent != inside:
        raise CheckpointError(f"{run_dir / POINTER} points at {path}, which leads outside {run_dir / CHECKPOINTS}; refusing to follow it")
    if not path.is_dir() and _kept(path).is_dir():  # a kill landed between _replace's two renames
        _kept(path).rename(path)
    if not path.is_dir():
        raise CheckpointError(f"{run_dir / POINTER} points at {path}, which does not exist")
    return path


def _optimizer_tensors(sd: dict) -> tuple[dict[str, torch.Tensor], list[dict]]:
    """An optimizer state_dict as flat tensors ("{param index}.{key}") and its param groups."""
    tensors = {}
    for idx, st in sd["state"].items():
        for key, val in st.items():
            tensors[f"{idx}.{key}"] = val if torch.is_tensor(val) else torch.tensor(val)
    return tensors, sd["param_groups"]


def _optimizer_state(tensors: dict[str, torch.Tensor], groups: list[dict]) -> dict:
    state: dict[int, dict] = {}
    for name, val in tensors.items():
        idx, key = name.split(".", 1)
        state.setdefault(int(idx), {})[key] = val
    return {"state": state, "param_groups": groups}


def rng_to_json(state: torch.Tensor) -> str:
    return base64.b64encode(state.numpy().tobytes()).decode()


def rng_from_json(text: str) -> torch.Tensor:
    """A CPU generator state saved by rng_to_json (CheckpointError if it is not one)."""
    try:
        raw = base64.b64decode(text, validate=True)
    except (ValueError, TypeError):
        raise CheckpointError("checkpoint state holds a random-generator state that is not base64") from None
    if len(raw) != torch.get_rng_state().numel():
        raise CheckpointError(f"checkpoint state holds a random-generator state of {len(raw)} bytes, "
                              f"expected {torch.get_rng_state().numel()}")
    return torch.frombuffer(bytearray(raw), dtype=torch.uint8).clone()


def save_checkpoint(run_dir: Path, model: torch.nn.Module | dict, optimizer: torch.optim.Optimizer | dict | None, state: dict,
                    keep: int = 1, extra: dict[str, dict[str, torch.Tensor]] | None = None) -> Path:
    """Write a checkpoint folder and point checkpoint.json at it. ``model`` is a module or its
    weights (name -> tensor, shared tensors once); ``optimizer`` an optimizer or its state_dict
    (a sharded run passes the whole, gathered states: worldloom.train.dist); ``extra`` more
    tensor files of the same checkpoint (name -> tensors, written as ``<name>.safetensors``,
    e.g. an RL run's value head beside the model weights that `load_run` reads)."""
    run_dir = Path(run_dir)
    name = f"step-{state['step']:08d}"
    final = run_dir / CHECKPOINTS / name
    tmp = run_dir / CHECKPOINTS / f".{name}.tmp"
    for stale in (run_dir / CHECKPOINTS).glob(".step-*.tmp"):  # left by a run killed mid-save
        shutil.rmtree(stale, ignore_errors=True)
    remove_stale_temporaries(run_dir)  # e.g. a half-written checkpoint.json beside the real one
    tmp.mkdir(parents=True)
    weights = model if isinstance(model, dict) else model_state(model)
    save_tensors(tmp / "model.safetensors", weights, metadata={"format": FORMAT})
    full_state = dict(state, format=FORMAT)
    if optimizer is not None:
        tensors, groups = _optimizer_tensors(optimizer if isinstance(optimizer, dict) else optimizer.state_dict())
        save_tensors(tmp / "optimizer.safetensors", tensors, metadata={"format": FORMAT})
        full_state["optimizer_groups"] = groups
    for fname, tensors in (extra or {}).items():
        save_tensors(tmp / f"{fname}.safetensors", tensors, metadata={"format": FORMAT})
    write_json(tmp / "state.json", full_state)
    _replace(tmp, final)
    write_json(run_dir / POINTER, {"latest": f"{CHECKPOINTS}/{name}", "step": state["step"]})
    older = sorted(p for p in (run_dir / CHECKPOINTS).glob("step-*") if p != final)
    for p in older[: max(0, len(older) - (keep - 1))]:
        shutil.rmtree(p, ignore_errors=True)
    return final


def _kept(final: Path) -> Path:
    return final.with_name(f".{final.name}.old")


def _replace(tmp: Path, final: Path) -> None:
    """Put the finished folder ``tmp`` at ``final``. A checkpoint already there (the same step saved
    again) is renamed aside first and removed only after the new one is in place, so a kill at any
    moment leaves one of the two whole (``latest_checkpoint`` takes the kept one back)."""
    kept = _kept(final)
    if kept.exists():
        shutil.rmtree(kept)
    if final.exists():
        final.rename(kept)
    tmp.rename(final)
    shutil.rmtree(kept, ignore_errors=True)


def model_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The weights a checkpoint keeps: all of them, or, when some parameters are frozen (a LoRA
    run), only the trained ones (its adapters, a new head): the rest comes from the base run."""
    if all(p.requires_grad for p in model.parameters()):
        return _unique_state(model)
    trained = {name for name, p in model.named_parameters() if p.requires_grad}
    return {k: v for k, v in _unique_state(model).items() if k in trained}


def _unique_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """state_dict without the second name of tied weights (safetensors refuses shared storage)."""
    seen, out = set(), {}
    for name, t in model.state_dict().items():
        key = (t.data_ptr(), t.shape)
        if key in seen:
            continue
        seen.add(key)
        out[name] = t
    return out


_STATE_TYPES = {"step": int, "elapsed": (int, float), "precision": str, "data_rng": str, "torch_rng": str}


def read_state(ckpt: Path) -> dict:
    state = read_json(Path(ckpt) / "state.json", "checkpoint state")
    if state.get("format") != FORMAT:
        raise CheckpointError(f"{ckpt} is not a worldloom checkpoint (format {state.get('format')!r}, expected {FORMAT!r})")
    for key, tp in _STATE_TYPES.items():
        if key in state and (not isinstance(state[key], tp) or isinstance(state[key], bool)):
            raise CheckpointError(f"{ckpt}/state.json is corrupt: {key} is {state[key]!r}")
    if not isinstance(state.get("step"), int) or state["step"] < 0:
        raise CheckpointError(f"{ckpt}/state.json is corrupt: no step count")
    clock = state.get("clock", {})
    if not isinstance(clock, dict) or (clock and not all(isinstance(clock.get(k), (int, float)) for k in ("at", "seconds", "per_step"))):
        raise CheckpointError(f"{ckpt}/state.json is corrupt: clock {clock!r}")
    if state.get("precision") not in (None, "fp32", "bf16", "fp16"):
        raise CheckpointError(f"{ckpt}/state.json is corrupt: precision {state['precision']!r}")
    return state


def load_model_weights(model: torch.nn.Module, ckpt: Path) -> None:
    tensors = load_tensors(Path(ckpt) / "model.safetensors", "model weights")
    own = model.state_dict()
    frozen = {name for name, p in model.named_parameters() if not p.requires_grad}  # from a base run (model_state)
    frozen |= {name for name, _ in model.named_buffers()} if frozen else set()
    missing = [k for k in own if k not in tensors and not _is_tied_alias(model, k) and k not in frozen]
    unexpected = [k for k in tensors if k not in own]
    wrong = [k for k in tensors if k in own and tensors[k].shape != own[k].shape]
    if missing or unexpected or wrong:
        detail = (
            f"missing {missing[:2]}" if missing else f"unexpected {unexpected[:2]}" if unexpected
            else f"{wrong[0]} has shape {tuple(tensors[wrong[0]].shape)}, model expects {tuple(own[wrong[0]].shape)}"
        )
        raise CheckpointError(f"checkpoint {ckpt} is of another architecture than its config ({detail})")
    model.load_state_dict(tensors, strict=False)


def _is_tied_alias(model: torch.nn.Module, key: str) -> bool:
    return key == "head.weight" and getattr(model.cfg, "tie_weights", False)


RESUME_KEYS = ("optimizer_groups", "elapsed", "data_rng", "torch_rng")  # what resuming reads beyond the weights


def read_optimizer_state(ckpt: Path, state: dict) -> dict:
    """The optimizer state_dict saved in a checkpoint (the first step of resuming: it also checks that
    state.json has what resuming needs)."""
    tensors = load_tensors(Path(ckpt) / "optimizer.safetensors", "optimizer state")
    missing = [k for k in RESUME_KEYS if k not in state]
    if missing:
        raise CheckpointError(f"{ckpt}/state.json lacks {missing[0]!r}; this checkpoint can be loaded but not resumed")
    try:
        return _optimizer_state(tensors, state["optimizer_groups"])
    except (KeyError, ValueError) as e:
        raise CheckpointError(f"optimizer state in {ckpt} is damaged ({str(e).splitlines()[0][:100]})") from None


def load_optimizer(optimizer: torch.optim.Optimizer, ckpt: Path, state: dict, shard=None) -> None:
    """Load a checkpoint's optimizer state; ``shard`` adapts the whole state to sharded parameters first."""
    sd = read_optimizer_state(ckpt, state)
    try:
        optimizer.load_state_dict(shard(optimizer, sd) if shard else sd)
    except (KeyError, ValueError, RuntimeError) as e:
        raise CheckpointError(f"optimizer state in {ckpt} does not match the model ({str(e).splitlines()[0][:100]})") from None
