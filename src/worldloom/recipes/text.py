"""The text recipe: a language model on a UTF-8 text file.

    worldloom train shakespeare-char data.path=input.txt

The last ``data.val_fraction`` of the file is held out before the tokenizer is learned;
training draws random windows of the rest; `worldloom eval` scores every held-out token once.

``train.objective`` picks the loss (``worldloom.losses``): ``next`` (next-token prediction),
``masked`` (fill-mask with a bidirectional pass; its held-out figure is the masked-token loss)
or ``combined`` (next + ``train.mask_alpha`` x masked; its held-out figure stays the next-token
loss, comparable to a ``next`` run's). The masked ones add ``<mask>`` to the tokenizer and mask
each window with the training data's generator (``worldloom.data.masking``).
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch

from ..config import RunConfig
from ..data.masking import masked_batch
from ..data.text import TextData, read_corpus, split_text
from ..errors import ConfigError, DataError
from ..evaluate import sampled_loss
from ..losses import masked_token_loss, text_objective
from ..model import model_inputs
from ..run import TOKENIZER_DIR
from ..runtime import autocast
from ..tokenize import TextTokenizer
from . import Recipe


def prepare_text(cfg: RunConfig, tokenizer: TextTokenizer | None = None) -> tuple[TextData, TextTokenizer]:
    """The corpus split, tokenized (a new tokenizer is learned from the training part unless one is given)."""
    text = read_corpus(cfg.data.path)
    train_text, val_text = split_text(text, cfg.data.val_fraction)
    if tokenizer is None:
        tokenizer = TextTokenizer.train(cfg.tokenizer.kind, train_text, cfg.tokenizer.vocab_size,
                                        mask=cfg.train.objective != "next")
    data = TextData(tokenizer.encode(train_text), tokenizer.encode(val_text), len(val_text))
    data.check_context(cfg.model.context, cfg.data.path)
    return data, tokenizer


class TextTask:
    """A text file as a language-modelling task: random windows, held-out loss on the file's tail."""

    def __init__(self, cfg: RunConfig, run_dir: Path, resuming: bool):
        self.cfg = cfg
        tc = cfg.train
        self.objective = text_objective(tc.objective, tc.mask_alpha)  # (ModelOutput, batch) -> LossOutput
        tokenizer = TextTokenizer.load(Path(run_dir) / TOKENIZER_DIR) if resuming else None
        self.data, self.tokenizer = prepare_text(cfg, tokenizer)
        if tc.objective != "next" and self.tokenizer.mask_id is None:
            raise ConfigError(f"train.objective={tc.objective} needs a <mask> token, which this run's tokenizer lacks "
                              "(it was trained with train.objective=next); start a new run instead")

    def model_sizes(self) -> dict:
        return {"vocab_size": self.tokenizer.vocab_size}

    def save(self, run_dir: Path) -> None:
        self.tokenizer.save(Path(run_dir) / TOKENIZER_DIR)

    def describe(self) -> str:
        tc = self.cfg.train
        about = {"next": "",
                 "masked": f", objective masked ({tc.mask_rate:.0%} <mask>; held-out loss = masked-token cross-entropy)",
                 "combined": f", objective combined: next + {tc.mask_alpha:g} x masked ({tc.mask_rate:.0%} <mask>; "
                             "held-out loss = next-token)"}[tc.objective]
        return (f"vocab {self.tokenizer.vocab_size}, {len(self.data.train):,} training tokens, "
                f"{len(self.data.val):,} held-out{about}")

    def batch(self, batch_size: int, gen: torch.Generator) -> dict:
        return self._batch("train", batch_size, gen)

    def _batch(self, split: str, batch_size: int, gen: torch.Generator) -> dict:
        """Random windows of a split, masked (with the same generator) when the objective asks for it."""
        b = self.data.batch(split, batch_size, self.cfg.model.context, gen)
        tc = self.cfg.train
        return b if tc.objective == "next" else masked_batch(b, tc.objective, tc.mask_rate, self.tokenizer.mask_id, gen)

    def val_loss(self, model, precision: str, device) -> float:
        """The held-out next-token loss; for objective=masked, the held-out masked-token loss."""
        tc = self.cfg.train
        if tc.objective == "masked":
            return self._masked_val_loss(model, precision, device)
        return sampled_loss(model, self.data, self.cfg.model.context, tc.batch_size, tc.eval_batches, precision, device, seed=tc.seed + 1)

    def _masked_val_loss(self, model, precision: str, device) -> float:
        """Mean masked-token loss over a fixed set of masked held-out windows (the same every call)."""
        tc = self.cfg.train
        gen = torch.Generator().manual_seed(tc.seed + 1)
        batches = (self._batch("val", tc.batch_size, gen) for _ in range(tc.eval_batches))
        return masked_heldout(model, batches, precision, device)[0]


@torch.no_grad()
def masked_heldout(model, batches, precision: str, device) -> tuple[float, int]:
    """(mean cross-entropy over the masked positions, positions scored) of masked batches, bidirectional passes."""
    was_training = model.training
    model.eval()
    nats, count = 0.0, 0
    for b in batches:
        b = {k: v.to(device) for k, v in b.items()}
        n = int(b["mask"].sum())
        if n:
            with autocast(precision, device):
                logits = model(**model_inputs(b)).logits
            nats += masked_token_loss(logits, b["mask_target"], b["mask"]).item() * n
            count += n
    model.train(was_training)
    return nats / max(count, 1), count


def _masked_windows(data: TextData, cfg: RunConfig, mask_id: int, batch_size: int):
    """Every held-out window once, masked at train.mask_rate with a fixed seed (positions scored before excluded)."""
    gen = torch.Generator().manual_seed(cfg.train.seed + 1)
    for w in data.windows("val", cfg.model.context, batch_size):
        b = masked_batch(w, "masked", cfg.train.mask_rate, mask_id, gen)
        b["mask"] &= w["weight"] > 0  # the last window's overlap was scored by the one before
        yield b


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
    """`worldloom eval RUN` of a text run: every held-out token once (loss, perplexity, bits/char); a run
    trained with objective=masked: the masked-token loss over every held-out window."""
    from tqdm import tqdm

    from ..evaluate import full_heldout
    from ..runtime import resolve_precision

    if args.data:
        run.cfg.data.path = args.data
    elif not run.cfg.data.path:
        raise DataError(f"{args.run} names no text file (data.path is empty, as in an imported run); "
                        f"give one: worldloom eval {args.run} --data FILE")
    data, _ = prepare_text(run.cfg, run.tokenizer)
    device = torch.device("cpu")
    precision = resolve_precision(args.precision, device)
    if run.cfg.train.objective == "masked":
        loss, n = masked_heldout(run.model, _masked_windows(data, run.cfg, run.tokenizer.mask_id, args.batch_size), precision, device)
        res = {"loss_masked": loss, "masked_tokens": n, "mask_rate": run.cfg.train.mask_rate}
    else:
        with tqdm(total=len(data.val) - 1, desc="eval", unit="tok", disable=args.json or None, leave=False) as bar:
            res = full_heldout(run.model, data, run.cfg.model.context, args.batch_size, precision, device,
                               lambda n: bar.update(n - bar.n))
    res.update({"run": str(args.run), "step": run.state["step"], "data": run.cfg.data.path,
                "split": f"last {run.cfg.data.val_fraction:.0%} of the file", "precision": precision})
    if args.json:
        print(json.dumps(res, indent=2))
    elif "loss_masked" in res:
        print(f"{args.run} (step {res['step']}), held-out {res['split']} of {res['data']}, objective masked: "
              f"{res['masked_tokens']:,} tokens masked ({res['mask_rate']:.0%} of each window, fixed seed)")
        print(f"  masked-token loss {res['loss_masked']:.4f} nats/token   perplexity {math.exp(res['loss_masked']):.3f}")
    else:
        print(f"{args.run} (step {res['step']}), held-out {res['split']} of {res['data']}: {res['tokens']:,} tokens")
        print(f"  loss {res['loss']:.4f} nats/token   perplexity {res['perplexity']:.3f}   "
              f"{res['nats_per_char']:.4f} nats/char   {res['bits_per_char']:.4f} bits/char")
    return 0


RECIPE = Recipe("text", "a language model on a text file", TextTask, run, resume, load, evaluate,
                objectives=("next", "masked", "combined"))
