"""The text recipe: a language model on a UTF-8 text file.

    worldloom train shakespeare-char data.path=input.txt

The last ``data.val_fraction`` of the file is held out before the tokenizer is learned;
training draws random windows of the rest; `worldloom eval` scores every held-out token once.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from ..config import RunConfig
from ..data.text import TextData, read_corpus, split_text
from ..evaluate import sampled_loss
from ..losses import language_model_loss
from ..run import TOKENIZER_DIR
from ..tokenize import TextTokenizer
from . import Recipe


def prepare_text(cfg: RunConfig, tokenizer: TextTokenizer | None = None) -> tuple[TextData, TextTokenizer]:
    """The corpus split, tokenized (a new tokenizer is learned from the training part unless one is given)."""
    text = read_corpus(cfg.data.path)
    train_text, val_text = split_text(text, cfg.data.val_fraction)
    if tokenizer is None:
        tokenizer = TextTokenizer.train(cfg.tokenizer.kind, train_text, cfg.tokenizer.vocab_size)
    data = TextData(tokenizer.encode(train_text), tokenizer.encode(val_text), len(val_text))
    data.check_context(cfg.model.context, cfg.data.path)
    return data, tokenizer


class TextTask:
    """A text file as a language-modelling task: random windows, held-out loss on the file's tail."""

    objective = staticmethod(language_model_loss)

    def __init__(self, cfg: RunConfig, run_dir: Path, resuming: bool):
        self.cfg = cfg
        tokenizer = TextTokenizer.load(Path(run_dir) / TOKENIZER_DIR) if resuming else None
        self.data, self.tokenizer = prepare_text(cfg, tokenizer)

    def model_sizes(self) -> dict:
        return {"vocab_size": self.tokenizer.vocab_size}

    def save(self, run_dir: Path) -> None:
        self.tokenizer.save(Path(run_dir) / TOKENIZER_DIR)

    def describe(self) -> str:
        return f"vocab {self.tokenizer.vocab_size}, {len(self.data.train):,} training tokens, {len(self.data.val):,} held-out"

    def batch(self, batch_size: int, gen: torch.Generator) -> dict:
        return self.data.batch("train", batch_size, self.cfg.model.context, gen)

    def val_loss(self, model, precision: str, device) -> float:
        tc = self.cfg.train
        return sampled_loss(model, self.data, self.cfg.model.context, tc.batch_size, tc.eval_batches, precision, device, seed=tc.seed + 1)


def run(cfg: RunConfig, progress: bool = True, log=print) -> dict:
    from ..train import train

    return train(cfg, progress=progress, log=log)


def resume(run_dir: Path, overrides: list[str], progress: bool = True, log=print) -> dict:
    from ..train import train

    return train(resume=Path(run_dir), overrides=overrides, progress=progress, log=log)


def load(run_dir: Path) -> tuple[int, dict]:
    tokenizer = TextTokenizer.load(Path(run_dir) / TOKENIZER_DIR)
    return tokenizer.vocab_size, {"tokenizer": tokenizer}


def evaluate(args, run) -> int:
    """`worldloom eval RUN` of a text run: every held-out token once (loss, perplexity, bits/char)."""
    from tqdm import tqdm

    from ..evaluate import full_heldout
    from ..runtime import resolve_precision

    if args.data:
        run.cfg.data.path = args.data
    data, _ = prepare_text(run.cfg, run.tokenizer)
    device = torch.device("cpu")
    precision = resolve_precision(args.precision, device)
    with tqdm(total=len(data.val) - 1, desc="eval", unit="tok", disable=args.json or None, leave=False) as bar:
        res = full_heldout(run.model, data, run.cfg.model.context, args.batch_size, precision, device, lambda n: bar.update(n - bar.n))
    res.update({"run": str(args.run), "step": run.state["step"], "data": run.cfg.data.path,
                "split": f"last {run.cfg.data.val_fraction:.0%} of the file", "precision": precision})
    if args.json:
        print(json.dumps(res, indent=2))
    else:
        print(f"{args.run} (step {res['step']}), held-out {res['split']} of {res['data']}: {res['tokens']:,} tokens")
        print(f"  loss {res['loss']:.4f} nats/token   perplexity {res['perplexity']:.3f}   "
              f"{res['nats_per_char']:.4f} nats/char   {res['bits_per_char']:.4f} bits/char")
    return 0


RECIPE = Recipe("text", "a language model on a text file", TextTask, run, resume, load, evaluate)
