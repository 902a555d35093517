"""The bind recipe: views, captions and action sequences embedded into one space (ImageBind-style).

    worldloom train bind                                  # BabyAI-GoToLocal items; view-text and actions-text trained
    worldloom train bind bind.pairs=view-actions          # the pair trained directly (a reference)
    worldloom eval runs/bind --json                       # R@1 / R@5 both ways on held-out items, every pair

The task makes ``bind.items`` training items and ``bind.val_items`` held-out items (levels of other
seeds; ``worldloom.bind.items``), keeps them compressed in the run folder (``items/``) with the
caption tokenizer, and trains ``worldloom.bind.BindModel`` through the one training loop: batches of
items, symmetric InfoNCE over the pairs in ``bind.pairs`` (text is the hub). The held-out loss is the
same InfoNCE over fixed held-out batches. `worldloom eval` measures retrieval on every pair, the one
never trained together included (docs/binding.md).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from ..bind.data import TOKENIZER_DIR, encode_rows, text_tokenizer
from ..bind.items import VAL_SEEDS, load_items, make_items, save_items
from ..bind.loss import bind_objective
from ..config import RunConfig
from ..errors import ConfigError
from ..runtime import autocast
from . import Recipe, load_nothing, prepare_then_train, resume_training

ITEMS = "items"


class BindTask:
    def __init__(self, cfg: RunConfig, run_dir: Path, resuming: bool):
        self.cfg, self.run_dir = cfg, Path(run_dir)
        self.pairs = cfg.bind.pair_list()
        self.objective = bind_objective(self.pairs)
        self.items = items_of(cfg, self.run_dir, progress=False)
        self.tok = text_tokenizer(self.run_dir, self.items["train"]["text"])
        self.rows = {k: encode_rows(v, self.tok, cfg.bind.view, cfg.bind.text_len) for k, v in self.items.items()}

    def model_sizes(self) -> dict:
        return {"vocab_size": self.tok.vocab_size}

    def count(self, batch: dict) -> int:
        """Items in a batch (what the loop's tokens/s counts)."""
        return len(batch["input"])

    def batch(self, batch_size: int, gen: torch.Generator) -> dict:
        idx = torch.randperm(len(self.rows["train"]), generator=gen)[:batch_size]  # distinct items: one positive each
        return {"input": self.rows["train"][idx]}

    @torch.no_grad()
    def val_loss(self, model, precision: str, device) -> float:
        """The trained pairs' InfoNCE over the held-out items in fixed batches of train.batch_size (or all of them)."""
        was = model.training
        model.eval()
        rows = self.rows["val"]
        b = min(self.cfg.train.batch_size, len(rows))
        total, n = 0.0, 0
        for i in range(0, len(rows) - b + 1, b):  # whole batches only: the loss depends on the batch size
            with autocast(precision, device):
                out = model(rows[i:i + b].to(device))
            total += float(self.objective(out, {}).total)
            n += 1
        model.train(was)
        return total / max(n, 1)

    def save(self, run_dir: Path) -> None:
        for split, items in self.items.items():
            if not (Path(run_dir) / ITEMS / f"{split}.npz").is_file():
                save_items(Path(run_dir) / ITEMS / f"{split}.npz", items)
        self.tok.save(Path(run_dir) / TOKENIZER_DIR)

    def describe(self) -> str:
        pairs = ", ".join("-".join(p) for p in self.pairs)
        return (f"{len(self.rows['train']):,} items of {self.cfg.env.id} ({len(self.rows['val']):,} held-out); "
                f"pairs trained: {pairs}")


def items_of(cfg: RunConfig, run_dir: Path, progress: bool) -> dict:
    """The run's training and held-out items: read from its items/ folder, or made now."""
    b = cfg.bind
    if cfg.train.batch_size > b.items:
        raise ConfigError(f"train.batch_size={cfg.train.batch_size} is larger than bind.items={b.items}")
    out = {}
    for split, n in (("train", b.items), ("val", b.val_items)):
        path = Path(run_dir) / ITEMS / f"{split}.npz"
        seed = cfg.data.seed + (VAL_SEEDS if split == "val" else 0)
        out[split] = load_items(path) if path.is_file() else make_items(cfg.env.id, n, seed, b.per_level, b.action_len,
                                                                          progress, desc=f"items ({split})")
    return out


def build_model(cfg: RunConfig):
    from ..bind.model import BindModel

    return BindModel(cfg)


def run(cfg: RunConfig, progress: bool = True, log=print) -> dict:
    """Make the items (with a progress bar; kept in the run folder), then train."""
    return prepare_then_train(cfg, items_of, save_items, ITEMS, progress, log)


def evaluate(args, run) -> int:
    """`worldloom eval RUN` of a bind run: retrieval on the held-out items for every pair of modalities."""
    from ..bind.evaluate import evaluate_bind, format_table

    res = evaluate_bind(run, Path(args.run))
    print(json.dumps(res, indent=2) if args.json else format_table(res))
    return 0


RECIPE = Recipe("bind", "modality binding: views, captions and action sequences in one embedding space (InfoNCE, text as the hub)",
                BindTask, run, resume_training, load_nothing, evaluate, build_model=build_model)
