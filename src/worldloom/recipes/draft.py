"""The draft recipe: a small model distilled from a target run, to draft for it (`generate --draft`).

    worldloom tune draft runs/big name=big-draft                       # 1/4 the layers, half the width
    worldloom tune draft runs/big model.n_layer=4 model.d_model=224 model.n_head=4 draft.init=runs/small
    worldloom generate runs/big "ROMEO:" --draft runs/big-draft

Speculative decoding gains only as far as the draft says what the target would say: a draft
trained on the same text as the target learns the text, not the target, and agrees with it on
about half the tokens (BENCHMARKS.md, issue 14). This recipe trains the draft on the target's own
generations (``draft.samples`` prompts of ``draft.prompt`` tokens cut from the target's training
text, each continued by the target for ``draft.length`` tokens, greedy unless
``draft.temperature`` > 0; `worldloom.tune.distill`, as Medusa's heads are trained): next-token
cross-entropy on the generated tokens, the greedy acceptance rule's own target (DistillSpec,
Zhou et al. 2024, distils a draft on the target's outputs the same way).

The draft is a text run of its own: the target's tokenizer (so `--draft` accepts it), backbone
and context; its size from ``model.*`` (default: a quarter of the target's layers, at least one,
half its width and heads), or the model of ``draft.init``, a text run with the target's
tokenizer whose weights it starts from (a draft already trained on the corpus). Its checkpoints
hold every weight; ``tune.base`` and ``tune.base_hash`` name the target it was distilled from
(provenance only: it loads without it).

After training, ``tune_eval.json``: the held-out generations' loss and top-1 agreement with the
target (``agreement``: how often the draft's greedy token is the target's, given the target's
prefix: the per-token acceptance rate of greedy speculative decoding), and the tokens per target
pass of greedy speculative decoding (k = 4) of a few held-out prompts (``tokens_per_forward``: a
count, the speed-up's upper bound).
"""

from __future__ import annotations

from pathlib import Path

import torch

from ..config import RunConfig, apply_overrides, from_dict, to_dict
from ..errors import ConfigError, DataError
from ..io import write_json
from ..losses import language_model_loss
from ..run import TOKENIZER_DIR
from ..tokenize import TextTokenizer
from ..tune.distill import DISTILL, Generations, rows
from . import Recipe
from .text import load

TRAIN_DEFAULTS = {"max_steps": 600, "batch_size": 32, "lr": 2e-3, "min_lr": 2e-4, "warmup_steps": 30, "eval_interval": 100,
                  "eval_batches": 8, "log_interval": 20, "precision": "fp32", "weight_decay": 0.01}
SIZE_KEYS = ("n_layer", "d_model", "n_head", "n_kv_head", "d_ff")


def draft_size(model: dict) -> dict:
    """The default draft of a target's model section: a quarter of its layers (at least 1), half its
    width (a multiple of its halved head count, at least 32) and heads."""
    heads = max(1, model["n_head"] // 2)
    width = max(32, model["d_model"] // 2)
    return {"n_layer": max(1, model["n_layer"] // 4), "n_head": heads, "n_kv_head": 0,
            "d_model": -(-width // heads) * heads, "d_ff": 0}


def tuned_config(base: Path, recipe: str, overrides: list[str], train_defaults: dict) -> RunConfig:
    """A new draft run's config: the target's tokenizer, backbone, context and data; its own size
    (``model.*``, ``draft.init``'s model, or `draft_size`); the recipe's training defaults."""
    from ..run import read_run_config
    from ..tune.base import weights_hash
    from . import get_recipe

    base = Path(base)
    bcfg = read_run_config(base)
    if get_recipe(bcfg.recipe).world:
        raise ConfigError(f"{base} is a {bcfg.recipe} (world) run; a draft model drafts for a text run")
    if bcfg.quant.bits:
        raise ConfigError(f"{base} is quantised (quant.bits={bcfg.quant.bits:g}); distil a draft from its full-precision run")
    data = to_dict(bcfg)
    data.update(recipe=recipe, name=recipe, train=dict(train_defaults), lora={}, dpo={}, orpo={}, medusa={}, quant={})
    data["tune"] = {k: v for k, v in data["tune"].items() if k in ("prompt_format", "stop")}
    data["model"].update(draft_size(data["model"]), value_head=False)
    data["data"] = {k: data["data"][k] for k in ("path", "val_fraction")}
    apply_overrides(data, overrides)
    init = data.get("draft", {}).get("init", "")
    if init:
        icfg = read_run_config(Path(init))
        if get_recipe(icfg.recipe).world or icfg.quant.bits or icfg.lora.rank or icfg.recipe == "medusa":
            raise ConfigError(f"draft.init={init} must be a plain text run (its own weights, full precision)")
        sized = [o.split("=", 1)[0] for o in overrides if o.split("=", 1)[0].startswith("model.")]
        if sized:
            raise ConfigError(f"{sized[0]} and draft.init={init} both set the draft's model; the draft takes {init}'s "
                              "model: drop one")
        data["model"] = to_dict(icfg.model)
    data["tune"].update(base=str(base.resolve()), base_hash=weights_hash(base))
    return from_dict(RunConfig, data)


class DraftTask:
    """Rows = prompt + the target's continuation; objective = next-token cross-entropy on the continuation."""

    def __init__(self, cfg: RunConfig, run_dir: Path, resuming: bool):
        from ..tune.base import base_dir

        self.cfg, self.run_dir = cfg, Path(run_dir)
        if not cfg.tune.base:
            raise DataError("recipe draft distils a draft from another run: `worldloom tune draft RUN name=NAME`")
        dc = cfg.draft
        if dc.prompt >= cfg.model.context:
            raise ConfigError(f"draft.prompt ({dc.prompt}) must be shorter than the draft's context ({cfg.model.context})")
        self.length = min(dc.length, cfg.model.context + 1 - dc.prompt)  # a row's inputs fit the context
        source = self.run_dir if resuming else base_dir(cfg)
        self.tokenizer = TextTokenizer.load(source / TOKENIZER_DIR)
        if not resuming and dc.init:
            init_tok = TextTokenizer.load(Path(dc.init) / TOKENIZER_DIR)
            if init_tok.tok.to_str() != self.tokenizer.tok.to_str():
                raise ConfigError(f"draft.init={dc.init} has another tokenizer than the target {cfg.tune.base}; "
                                  "a draft must share the target's tokenizer")
        self.gens = Generations(dc, cfg.tune.base_hash, self.length)
        self.resuming = resuming
        self.train = self.val = None

    # ---------------------------------------------------------------- Task protocol

    def model_sizes(self) -> dict:
        return {"vocab_size": self.tokenizer.vocab_size}

    def prepare_model(self, model) -> None:
        """The draft's first weights (draft.init's, else fresh) and the target's generations (made now, or read back)."""
        cached = self.gens.cached(self.run_dir)
        if self.cfg.draft.init and not self.resuming:  # a resumed run loads its own checkpoint next
            from ..checkpoint import latest_checkpoint, load_model_weights

            ckpt = latest_checkpoint(Path(self.cfg.draft.init))
            if ckpt is None:
                raise DataError(f"draft.init={self.cfg.draft.init} holds no checkpoint yet (train it first)")
            load_model_weights(model, ckpt)
        self.train, self.val = cached or self._generate()

    def _generate(self) -> tuple[torch.Tensor, torch.Tensor]:
        from ..run import load_run
        from ..tune.base import base_dir, weights_hash

        where = base_dir(self.cfg, self.run_dir)
        if weights_hash(where) != self.cfg.tune.base_hash:
            raise DataError(f"target run {where} has changed since this draft run began (its weights' sha256 differs)")
        target = load_run(where)
        return self.gens.generate(target.model, self.cfg, self.tokenizer)

    def objective(self, out, batch):
        return language_model_loss(out, batch)

    def batch(self, batch_size: int, gen: torch.Generator) -> dict:
        return rows(self.train[torch.randint(len(self.train), (batch_size,), generator=gen)], self.cfg.draft.prompt)

    @torch.no_grad()
    def val_loss(self, model, precision: str, device) -> float:
        return self.held_out(model, precision, device)[0]

    @torch.no_grad()
    def held_out(self, model, precision: str, device) -> tuple[float, float]:
        """(loss, top-1 agreement with the target) over every held-out generated token."""
        from ..losses import next_token_loss
        from ..model import model_inputs
        from ..runtime import autocast

        was = model.training
        model.eval()
        nats = agree = n = 0.0
        for i in range(0, len(self.val), self.cfg.train.batch_size):
            b = {k: v.to(device) for k, v in rows(self.val[i : i + self.cfg.train.batch_size], self.cfg.draft.prompt).items()}
            with autocast(precision, device):
                logits = model(**model_inputs(b)).logits
            w = b["weight"]
            nats += float(next_token_loss(logits, b["target"], w)) * float(w.sum())
            agree += float(((logits.argmax(-1) == b["target"]).float() * w).sum())
            n += float(w.sum())
        model.train(was)
        return nats / max(n, 1.0), agree / max(n, 1.0)

    def save(self, run_dir: Path) -> None:
        self.tokenizer.save(Path(run_dir) / TOKENIZER_DIR)
        self.gens.save(run_dir, self.train, self.val)

    def describe(self) -> str:
        dc = self.cfg.draft
        return (f"a draft distilled from {self.cfg.tune.base}: {len(self.train):,} of its generations ({dc.prompt} prompt + "
                f"{self.length} generated tokens, {'greedy' if not dc.temperature else f'T={dc.temperature:g}'}), "
                f"{len(self.val):,} held out, vocab {self.tokenizer.vocab_size}"
                + (f", starting from {dc.init}" if dc.init else ""))


def after(summary: dict, run_dir: Path, log=print) -> dict:
    """After training: held-out loss, agreement and greedy speculative tokens per target pass -> tune_eval.json."""
    from ..run import load_run
    from ..tune.base import base_dir

    draft = load_run(run_dir)
    task = DraftTask(draft.cfg, run_dir, resuming=True)
    task.train, task.val = task.gens.cached(run_dir) or (None, None)
    if task.val is None:
        raise DataError(f"{run_dir} lacks its self-distillation data ({DISTILL}.safetensors)")
    loss, agreement = task.held_out(draft.model, "fp32", torch.device("cpu"))
    res = {"val_loss": loss, "agreement": agreement, "rows": len(task.val)}
    where = base_dir(draft.cfg, run_dir)
    if where.is_dir():
        res["tokens_per_forward"] = _tokens_per_forward(load_run(where).model, draft.model, task)
    write_json(Path(run_dir) / "tune_eval.json", res)
    log(f"held-out generations of the target: the draft's greedy token is the target's {agreement:.1%} of the time "
        f"(loss {loss:.4f})" + (f"; greedy speculative decoding of their prompts (k = 4): {res['tokens_per_forward']:.2f} "
                                "tokens per target pass" if "tokens_per_forward" in res else ""))
    summary.update(res)
    return summary


def _tokens_per_forward(target, draft, task: DraftTask, prompts: int = 8) -> float:
    """Greedy speculative decoding of up to 8 held-out prompts, one at a time: tokens per target pass (a count)."""
    from ..decode import SamplingConfig
    from ..inference.speculative import ModelDrafter, SpecStats, speculative_ids

    stats = SpecStats()
    sc = SamplingConfig(max_new_tokens=task.length, temperature=0.0)
    with torch.no_grad():
        for row in task.val[:prompts]:
            for _ in speculative_ids(target, [row[: task.cfg.draft.prompt].tolist()], sc, ModelDrafter(draft), k=4, stats=stats):
                pass
    return stats.tokens_per_forward


def run(cfg: RunConfig, progress: bool = True, log=print) -> dict:
    from ..tune.common import run_tuned

    return run_tuned(cfg, progress, log)


def resume(run_dir: Path, overrides: list[str], progress: bool = True, log=print) -> dict:
    from ..tune.common import resume_tuned

    return resume_tuned(run_dir, overrides, progress, log)


def evaluate(args, run) -> int:
    """`worldloom eval` of a draft: a text run's held-out evaluation on the target's text."""
    from .text import evaluate as text_evaluate

    return text_evaluate(args, run)


RECIPE = Recipe("draft", "a draft model distilled from a target text run's own generations (generate --draft)",
                DraftTask, run, resume, load, evaluate)
