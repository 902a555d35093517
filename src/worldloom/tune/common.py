"""What the tuning recipes (sft, dpo, orpo, reward) share: the base run, rows as token ids, the
held-out split, batches, and the checker-scored evaluation at the end of a run.

A row is a prompt and a response (SFT) or a prompt and two responses (a preference pair). As
the model reads it: ``tune.prompt_format`` around the prompt (``Q: {prompt}\\nA: ``), then the
response and ``tune.stop``; the prompt and the response are encoded apart, as sampling later
encodes the prompt alone. Losses count the response tokens only (``weight``).

The held-out rows are chosen by a hash of the prompt (``tune.val_fraction``), so a prompt and
all its pairs fall on one side, and a resumed run holds out the same rows.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

import torch

from ..config import RunConfig
from ..errors import DataError
from ..io import write_json
from ..run import TOKENIZER_DIR
from ..tokenize import TextTokenizer
from .base import base_dir, prepare_tuned


def split_rows(rows: list[dict], cfg: RunConfig) -> tuple[list[dict], list[dict]]:
    """(training rows, held-out rows) by the prompt's hash; at least one of each."""
    val = [r for r in rows if held_out(r["prompt"], cfg.tune.val_fraction)]
    train = [r for r in rows if not held_out(r["prompt"], cfg.tune.val_fraction)]
    if not val or not train:
        raise DataError(f"{cfg.data.path}: {len(rows)} rows are too few to hold some out "
                        f"(tune.val_fraction={cfg.tune.val_fraction}); give more rows")
    return train, val


def read_rows(cfg: RunConfig) -> list[dict]:
    """The rows of a tuned run's data.path: instruction rows (sft) or preference pairs (the others)."""
    from .data import read_instructions, read_preferences

    if cfg.recipe == "sft":
        return read_instructions(cfg.data.path, cfg.tune.prompt_format, cfg.tune.stop)
    return read_preferences(cfg.data.path)


@dataclass
class Encoded:
    """One response to a prompt, as ids: ``ids`` = prompt ids + response ids (stop included)."""

    ids: list[int]
    start: int  # the first response token's index in ids


def held_out(prompt: str, fraction: float) -> bool:
    """Whether a prompt belongs to the held-out rows (a stable hash, not the file's order)."""
    h = int.from_bytes(hashlib.sha256(prompt.encode("utf-8")).digest()[:8], "big")
    return (h % 1_000_000) < fraction * 1_000_000


class TunedTask:
    """The Task part every tuning recipe shares; a recipe adds its rows, batches, objective and held-out loss."""

    def __init__(self, cfg: RunConfig, run_dir: Path, resuming: bool):
        self.cfg, self.run_dir = cfg, Path(run_dir)
        if not cfg.tune.base:
            raise DataError(f"recipe {cfg.recipe} tunes another run: start it with `worldloom tune {cfg.recipe} RUN ...`")
        if not cfg.data.path:
            raise DataError(f"give the rows to tune on: worldloom tune {cfg.recipe} RUN data.path=FILE.jsonl")
        source = self.run_dir if resuming else base_dir(cfg)
        self.tokenizer = TextTokenizer.load(source / TOKENIZER_DIR)

    # ---------------------------------------------------------------- rows as ids

    def encode(self, prompt: str, response: str, rendered: bool = False) -> Encoded:
        tc = self.cfg.tune
        p = self.tokenizer.encode(prompt if rendered else tc.prompt_format.format(prompt=prompt)).tolist()
        r = self.tokenizer.encode(response + tc.stop).tolist()
        ids = p + r
        if len(ids) - 1 > self.cfg.model.context:
            raise DataError(f"{self.cfg.data.path}: the row with prompt {prompt[:40]!r} is {len(ids)} tokens, longer than "
                            f"the model's context ({self.cfg.model.context} + 1); shorten or drop it")
        return Encoded(ids, len(p))

    def split(self, rows: list[dict]) -> tuple[list[dict], list[dict]]:
        return split_rows(rows, self.cfg)

    # ---------------------------------------------------------------- Task protocol

    def model_sizes(self) -> dict:
        return {"vocab_size": self.tokenizer.vocab_size}

    def prepare_model(self, model) -> None:
        prepare_tuned(model, self.cfg)

    def save(self, run_dir: Path) -> None:
        self.tokenizer.save(Path(run_dir) / TOKENIZER_DIR)


def padded(seqs: list[list[int]], weights: list[list[float]], shift: bool = True) -> dict:
    """Token lists and per-token weights -> a right-padded batch: "input" (B, L) and "target"/"weight"
    (B, L) the next tokens and their weights (shift=True), or the ids themselves with "last" (B,) the index
    of each row's last token (shift=False: a reward model reads the whole row)."""
    n = [len(s) - (1 if shift else 0) for s in seqs]
    L = max(n)
    inp = torch.zeros(len(seqs), L, dtype=torch.long)
    tgt = torch.zeros(len(seqs), L, dtype=torch.long)
    w = torch.zeros(len(seqs), L)
    for i, (s, ws) in enumerate(zip(seqs, weights)):
        s, ws = torch.tensor(s), torch.tensor(ws, dtype=torch.float32)
        if shift:
            inp[i, : n[i]], tgt[i, : n[i]], w[i, : n[i]] = s[:-1], s[1:], ws[1:]
        else:
            inp[i, : n[i]], tgt[i, : n[i]], w[i, : n[i]] = s, s, ws
    batch = {"input": inp, "target": tgt, "weight": w}
    if not shift:
        batch["last"] = torch.tensor(n) - 1
    return batch


def response_weights(e: Encoded) -> list[float]:
    return [0.0] * e.start + [1.0] * (len(e.ids) - e.start)


# ---------------------------------------------------------------- the checker-scored evaluation


@torch.no_grad()
def answers(model, tokenizer, cfg: RunConfig, prompts: list[str], temperature: float = 0.0, seed: int = 0,
            batch: int = 64, max_new_tokens: int = 32, progress=None, rendered: bool = False) -> list[str]:
    """The model's responses to raw prompts (formatted by tune.prompt_format unless `rendered`, cut at tune.stop)."""
    from ..decode import SamplingConfig, generate

    model.eval()
    out = []
    for i in range(0, len(prompts), batch):
        texts = [p if rendered else cfg.tune.prompt_format.format(prompt=p) for p in prompts[i : i + batch]]
        sc = SamplingConfig(max_new_tokens=max_new_tokens, temperature=temperature, seed=seed + i)
        out += generate(model, tokenizer, texts, sc, stop=[cfg.tune.stop])
        if progress:
            progress(len(out))
    return out


def task_accuracy(model, tokenizer, cfg: RunConfig, rows: list[dict], progress=None) -> dict:
    """Greedy answers to rows that name a checkable task: accuracy overall and per task, and the answers."""
    from .tasks import check

    rows = [r for r in rows if r.get("task")]
    if not rows:
        return {}
    got = answers(model, tokenizer, cfg, [r["prompt"] for r in rows], progress=progress)
    ok = [bool(check(r, a)) for r, a in zip(rows, got)]
    per: dict[str, list[bool]] = {}
    for r, k in zip(rows, ok):
        per.setdefault(r["task"], []).append(k)
    return {"accuracy": sum(ok) / len(ok), "rows": len(ok), "per_task": {k: sum(v) / len(v) for k, v in sorted(per.items())},
            "correct": ok, "answers": got}


def finish(summary: dict, run_dir: Path, log=print) -> dict:
    """After training: the checker's accuracy on held-out rows (tune.eval_rows of them) -> tune_eval.json."""
    from ..run import load_run

    run = load_run(run_dir)
    n = run.cfg.tune.eval_rows
    rows = split_rows(read_rows(run.cfg), run.cfg)[1][:n] if n else []
    res = task_accuracy(run.model, run.tokenizer, run.cfg, rows) if n else {}
    if res:
        res.pop("answers"), res.pop("correct")
        write_json(Path(run_dir) / "tune_eval.json", res)
        log(f"held-out rows: {res['accuracy']:.1%} answered right by the checker ({res['rows']} rows; "
            + ", ".join(f"{k} {v:.0%}" for k, v in res["per_task"].items()) + ")")
    summary.update(res)
    return summary


def tune_recipe(method: str, run: Path | None, overrides: list[str], resume: Path | None = None,
                progress: bool = True, log=print) -> dict:
    """`worldloom tune sft|dpo|orpo|reward|medusa|draft RUN ...` (or --resume): a new tuned run through the training loop."""
    import importlib

    from ..train import train
    from .base import tuned_config

    module = importlib.import_module(f"worldloom.recipes.{method}")
    if resume is None:
        overrides = getattr(module, "tune_overrides", lambda _, o: o)(run, list(overrides))  # a recipe's shorthands
        config = getattr(module, "tuned_config", tuned_config)  # a draft has a model of its own
        return run_tuned(config(run, method, overrides, module.TRAIN_DEFAULTS), progress, log)
    return _after(method, train(resume=resume, overrides=overrides, progress=progress, log=log), log)


class PairTask(TunedTask):
    """Preference pairs (prompt, chosen, rejected) as batches of 2B rows: the B chosen, then the B rejected."""

    shift = True  # rows as next-token inputs and targets (False: the whole row, for a reward model)

    def __init__(self, cfg: RunConfig, run_dir: Path, resuming: bool):
        super().__init__(cfg, run_dir, resuming)
        from .data import read_preferences

        self.train_rows, self.val_rows = self.split(read_preferences(cfg.data.path))
        self.train = [self._pair(r) for r in self.train_rows]
        self.val = [self._pair(r) for r in self.val_rows]

    def _pair(self, row: dict) -> tuple[Encoded, Encoded]:
        return self.encode(row["prompt"], row["chosen"]), self.encode(row["prompt"], row["rejected"])

    def pair_batch(self, pairs: list[tuple[Encoded, Encoded]]) -> dict:
        rows = [p[0] for p in pairs] + [p[1] for p in pairs]
        return padded([e.ids for e in rows], [response_weights(e) for e in rows], self.shift)

    def batch(self, batch_size: int, gen: torch.Generator) -> dict:
        idx = torch.randint(len(self.train), (batch_size,), generator=gen)
        return self.extras(self.pair_batch([self.train[i] for i in idx.tolist()]), idx, "train")

    def extras(self, b: dict, pairs: torch.Tensor, split: str) -> dict:
        """A batch of the given pairs (indices into the split) as the objective reads it (DPO adds the
        reference's log-probabilities)."""
        return b

    def val_batches(self, batch_size: int):
        """Every held-out pair once, in order."""
        for i in range(0, len(self.val), batch_size):
            yield self.extras(self.pair_batch(self.val[i : i + batch_size]), torch.arange(i, min(i + batch_size, len(self.val))), "val")

    @torch.no_grad()
    def val_loss(self, model, precision: str, device) -> float:
        """The objective's loss over every held-out pair (weighted by pairs)."""
        from ..model import model_inputs
        from ..runtime import autocast

        was = model.training
        model.eval()
        total, n = 0.0, 0
        for b in self.val_batches(self.cfg.train.batch_size):
            b = {k: v.to(device) for k, v in b.items()}
            with autocast(precision, device):
                out = self.objective(model(**model_inputs(b)), b)
            k = b["input"].shape[0] // 2
            total, n = total + float(out.total) * k, n + k
        model.train(was)
        return total / max(n, 1)

    def describe(self) -> str:
        return f"{len(self.train):,} preference pairs, {len(self.val):,} held out, vocab {self.tokenizer.vocab_size}"


# ---------------------------------------------------------------- what every tuning recipe's RECIPE holds


def run_tuned(cfg: RunConfig, progress: bool = True, log=print) -> dict:
    """Train a tuned run's config (made by `worldloom tune`), then score its held-out rows."""
    from ..train import train

    return _after(cfg.recipe, train(cfg, progress=progress, log=log), log)


def _after(recipe: str, summary: dict, log) -> dict:
    """What a tuning recipe does once its training is over: its module's ``after``, else ``finish``."""
    import importlib

    module = importlib.import_module(f"worldloom.recipes.{recipe}")
    return getattr(module, "after", finish)(summary, Path(summary["run_dir"]), log)


def resume_tuned(run_dir: Path, overrides: list[str], progress: bool = True, log=print) -> dict:
    from ..run import read_run_config

    return tune_recipe(read_run_config(run_dir).recipe, None, overrides, resume=Path(run_dir), progress=progress, log=log)


def evaluate_tuned(args, run) -> int:
    from .evaluate import evaluate_tuned as evaluate

    return evaluate(args, run)
