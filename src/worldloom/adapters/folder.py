"""A LoRA run made plain: ``worldloom lora merge RUN OUT``.

An adapted run's checkpoint holds only its adapters; the rest of its model is its base run's.
The merged folder stands alone: its config is the adapted run's with ``lora.rank=0`` (``tune.base``
and ``tune.base_hash`` stay, as provenance only: with rank 0 nothing reads the base again), the
tokenizer (or a world run's stream layout) copied, and one checkpoint of every weight with the
adapters folded in (``merged_state``). There is no optimizer state: the folder loads, generates,
evaluates, exports and tunes like any trained run, but it is a start, not a run to resume.

The folder is built under a temporary name and renamed into place (``io.atomic_folder``).
"""

from __future__ import annotations

import shutil
from pathlib import Path

from ..checkpoint import save_checkpoint
from ..config import RunConfig, from_dict, save_yaml, to_dict
from ..errors import CheckpointError
from ..io import atomic_folder, check_new_folder
from ..model import LWM
from ..run import CONFIG, TOKENIZER_DIR, load_run
from .lora import has_lora, merged_state


def merge_run(run_dir: Path, out: Path) -> Path:
    """Write the LoRA run at ``run_dir`` as a plain run folder at ``out``; return ``out``."""
    run_dir, out = Path(run_dir), Path(out)
    check_new_folder(out)  # before the (slower) load: a mistyped OUT fails at once
    run = load_run(run_dir)
    if not has_lora(run.model):
        raise CheckpointError(f"{run_dir} has no LoRA adapters (lora.rank={run.cfg.lora.rank}); it is a plain run already")
    data = to_dict(run.cfg)
    data.update(name=out.name, out_dir=str(out.parent))
    data["lora"]["rank"] = 0
    cfg = from_dict(RunConfig, data)
    plain = LWM(cfg.model)
    plain.load_state_dict(merged_state(run.model))  # strict: every weight of the plain model, nothing else
    with atomic_folder(out) as tmp:
        save_yaml(to_dict(cfg), tmp / CONFIG)
        part = _loader_folder(run)
        shutil.copytree(run_dir / part, tmp / part)
        save_checkpoint(tmp, plain, None, {"step": run.state["step"], "merged_from": str(run_dir.resolve())})
    return out


def _loader_folder(run) -> str:
    """The folder `load_run` reads beside the weights: a text run's tokenizer, a world run's stream layout."""
    if not run.is_world:
        return TOKENIZER_DIR
    from ..world.task import STREAM_DIR

    return STREAM_DIR
