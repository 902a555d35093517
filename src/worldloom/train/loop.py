"""The training loop for every recipe, read top to bottom.

    config -> task (data + tokenizers) -> model -> AdamW -> steps (eval + checkpoint) -> plot

A *task* owns what differs between recipes: the text task reads a corpus and learns a text
tokenizer; the world task (worldloom.world.task) reads collected episodes and builds the
stream layout. Both give batches for ``LWM.compute_loss`` and a held-out loss.

Resuming reloads the resolved config, the tokenizer, the weights, the optimizer moments
and every RNG state, so that a resumed run continues the exact sequence of the
uninterrupted one (the test suite checks it bit for bit in fp32). With a binding
train.max_minutes the schedule follows the clock, read at checkpoints only: a resumed run
replays the killed one exactly up to the next checkpoint, and follows its own clock after.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import torch
from tqdm import tqdm

from ..config import RunConfig, TrainConfig, apply_overrides, from_dict, save_yaml, to_dict
from ..data.text import TextData, read_corpus, split_text
from ..errors import CheckpointError, ConfigError
from ..evaluate import sampled_loss
from ..io import atomic_write_text
from ..memory import check_fits
from ..model import LWM
from ..run import CONFIG, METRICS, TOKENIZER_DIR, read_run_config
from ..runtime import autocast, resolve_device, resolve_precision, set_threads
from ..tokenize import TextTokenizer
from ..checkpoint import latest_checkpoint, load_model_weights, load_optimizer, read_state, rng_from_json, rng_to_json, save_checkpoint
from .optim import lr_at, make_optimizer
from .plots import plot_loss, read_metrics


def prepare_text(cfg: RunConfig, tokenizer: TextTokenizer | None = None) -> tuple[TextData, TextTokenizer]:
    text = read_corpus(cfg.data.path)
    train_text, val_text = split_text(text, cfg.data.val_fraction)
    if tokenizer is None:
        tokenizer = TextTokenizer.train(cfg.tokenizer.kind, train_text, cfg.tokenizer.vocab_size)
    data = TextData(tokenizer.encode(train_text), tokenizer.encode(val_text), len(val_text))
    data.check_context(cfg.model.context, cfg.data.path)
    return data, tokenizer


class TextTask:
    """A text file as a language-modelling task: random windows, held-out loss on the file's tail."""

    def __init__(self, cfg: RunConfig, run_dir: Path, resuming: bool):
        self.cfg = cfg
        tokenizer = TextTokenizer.load(run_dir / TOKENIZER_DIR) if resuming else None
        self.data, self.tokenizer = prepare_text(cfg, tokenizer)
        cfg.model.vocab_size = self.tokenizer.vocab_size

    def save(self, run_dir: Path) -> None:
        self.tokenizer.save(run_dir / TOKENIZER_DIR)

    def describe(self) -> str:
        return f"vocab {self.tokenizer.vocab_size}, {len(self.data.train):,} training tokens, {len(self.data.val):,} held-out"

    def batch(self, batch_size: int, gen: torch.Generator) -> dict:
        return self.data.batch("train", batch_size, self.cfg.model.context, gen)

    def val_loss(self, model, precision: str, device) -> float:
        tc = self.cfg.train
        return sampled_loss(model, self.data, self.cfg.model.context, tc.batch_size, tc.eval_batches, precision, device, seed=tc.seed + 1)


def make_task(cfg: RunConfig, run_dir: Path, resuming: bool):
    if cfg.recipe == "world":
        from ..world.task import WorldTask

        return WorldTask(cfg, run_dir, resuming)
    return TextTask(cfg, run_dir, resuming)


def resume_config(run_dir: Path, overrides: list[str]) -> RunConfig:
    """The saved config of a run, with `train.*` overrides (e.g. a longer max_steps)."""
    cfg = read_run_config(run_dir)
    bad = [o for o in overrides if not o.split("=", 1)[0].startswith("train.")]
    if bad:
        raise ConfigError(f"only train.* keys can change on --resume (got {bad[0]!r}); start a new run to change the rest")
    data = to_dict(cfg)
    apply_overrides(data, overrides)
    return from_dict(RunConfig, data)


class _Progress:
    """A bar over the fraction of the budget used (steps or minutes, whichever ends first)."""

    def __init__(self, enabled: bool, start: float):
        fmt = "{desc} {percentage:3.0f}%|{bar}| [{elapsed}<{remaining}{postfix}]"
        self.bar = tqdm(total=1000, initial=int(start * 1000), bar_format=fmt, desc="train", disable=not enabled or None, dynamic_ncols=True)
        self.shown = int(start * 1000)

    def update(self, progress: float, **postfix):
        n = int(min(progress, 1.0) * 1000)
        if n > self.shown:
            self.bar.update(n - self.shown)
            self.shown = n
        self.bar.set_postfix(postfix, refresh=False)

    def close(self):
        self.bar.close()


def train(cfg: RunConfig | None = None, resume: Path | None = None, overrides: list[str] = (), progress: bool = True, log=print,
          stop_at: float = 1.0) -> dict:
    """Train (or resume) a run and return its summary. Exactly one of cfg / resume is given.

    ``stop_at`` < 1 pauses the run (checkpoint saved) once that fraction of its budget is used;
    resuming it continues the same learning-rate schedule."""
    # ---- config and run folder
    if resume is not None:
        run_dir = Path(resume)
        cfg = resume_config(run_dir, list(overrides))
        ckpt = latest_checkpoint(run_dir)
        if ckpt is None:
            raise CheckpointError(f"cannot resume: {run_dir} holds no checkpoint yet; start it again without --resume")
    else:
        run_dir = cfg.run_dir
        if latest_checkpoint(run_dir) is not None:
            raise ConfigError(f"run folder {run_dir} already holds a checkpoint; continue it with --resume {run_dir} or choose another name=...")
        ckpt = None
    tc: TrainConfig = cfg.train
    set_threads(tc.threads)
    device = resolve_device(tc.device)
    state = read_state(ckpt) if ckpt else {}
    if ckpt and tc.max_steps < state["step"]:  # before anything is written: config.yaml must agree with the checkpoint
        raise ConfigError(f"{run_dir} has reached step {state['step']}; train.max_steps={tc.max_steps} would end it in the past "
                          f"(give train.max_steps >= {state['step']}; nothing was changed)")
    precision = state.get("precision") or resolve_precision(tc.precision, device)

    # ---- data and tokenizers (learned once, from the training part only)
    task = make_task(cfg, run_dir, resuming=ckpt is not None)

    # ---- model and optimizer
    check_fits(cfg, device)  # a one-line refusal instead of an allocator traceback
    torch.manual_seed(tc.seed)
    model = LWM(cfg.model).to(device)
    optimizer = make_optimizer(model, tc)
    gen = torch.Generator().manual_seed(tc.seed)
    step, elapsed_before = 0, 0.0
    if ckpt:
        load_model_weights(model, ckpt)
        load_optimizer(optimizer, ckpt, state)
        step, elapsed_before = state["step"], state["elapsed"]
        gen.set_state(rng_from_json(state["data_rng"]))
        torch.set_rng_state(rng_from_json(state["torch_rng"]))
        _truncate_metrics(run_dir / METRICS, step)
    else:
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / METRICS).unlink(missing_ok=True)
        task.save(run_dir)
    save_yaml(to_dict(cfg), run_dir / CONFIG)
    if tc.compile:
        model.compile()  # in place: compute_loss and evaluation use the compiled forward

    n_params = model.num_params()
    log(f"run {run_dir}: {n_params / 1e6:.2f}M parameters, {task.describe()}, {device} {precision}" + (f", resuming at step {step}" if ckpt else ""))

    budget = tc.max_minutes * 60.0
    t_start = time.perf_counter() - elapsed_before

    def elapsed() -> float:
        return time.perf_counter() - t_start

    # The schedule's clock: seconds used at the last checkpoint and seconds per step since the one before. Between
    # checkpoints the schedule extrapolates from them instead of reading the clock, so that a resumed run replays
    # the killed one's learning rates exactly (before the first checkpoint: the clock itself).
    clock = dict(state.get("clock") or {})

    def fraction() -> float:
        f = step / tc.max_steps
        if not budget:
            return f
        seconds = clock["seconds"] + (step - clock["at"]) * clock["per_step"] if clock else elapsed()
        return max(f, seconds / budget)

    def budget_left() -> bool:
        return step < tc.max_steps and not (budget and elapsed() >= budget)

    saved_step = step if ckpt else None  # the step of the newest checkpoint on disk

    def checkpoint(val_loss: float | None):
        nonlocal saved_step
        saved_step = step
        if budget:
            now, at, before = elapsed(), clock.get("at", 0), clock.get("seconds", 0.0)
            clock.update(at=step, seconds=now, per_step=(now - before) / max(step - at, 1))
        save_checkpoint(run_dir, model, optimizer, {
            "step": step, "elapsed": elapsed(), "precision": precision, "val_loss": val_loss, "clock": clock,
            "data_rng": rng_to_json(gen.get_state()), "torch_rng": rng_to_json(torch.get_rng_state()),
        })

    def evaluate() -> float:
        val = task.val_loss(model, precision, device)
        _append(run_dir / METRICS, {"step": step, "val_loss": val, "elapsed": round(elapsed(), 2)})
        plot_loss(run_dir / METRICS, run_dir / "loss.png", title=f"{cfg.name}: {n_params / 1e6:.1f}M params")
        return val

    bar = _Progress(progress, fraction())
    val_loss = state.get("val_loss")
    model.train()
    t_log, tokens_since = time.perf_counter(), 0
    try:
        while budget_left() and fraction() < stop_at:
            lr = lr_at(step, fraction(), tc)
            for group in optimizer.param_groups:
                group["lr"] = lr
            loss_sum, extra = 0.0, {}
            for _ in range(tc.grad_accum):
                batch = {k: v.to(device) for k, v in task.batch(tc.batch_size, gen).items()}
                tokens_since += batch["input"].numel()
                with autocast(precision, device):
                    out = model.compute_loss(batch)
                (out.total / tc.grad_accum).backward()
                loss_sum += out.parts.get("loss", out.total.item())  # the cross-entropy, comparable to held-out loss
                for k, v in out.parts.items():  # other parts (e.g. moe_aux) are logged as their micro-batch mean
                    if k != "loss" and isinstance(v, (int, float)):
                        extra[k] = extra.get(k, 0.0) + v / tc.grad_accum
            if tc.grad_clip > 0:
                torch.nn.utils.clip_grad_norm_(model.parameters(), tc.grad_clip)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            step += 1
            loss = loss_sum / tc.grad_accum
            if step % tc.log_interval == 0:
                now = time.perf_counter()
                tps = tokens_since / (now - t_log)
                t_log, tokens_since = now, 0
                _append(run_dir / METRICS, {"step": step, "loss": loss, **extra, "lr": lr, "tokens_per_s": round(tps, 1), "elapsed": round(elapsed(), 2)})
                bar.update(fraction(), step=step, loss=f"{loss:.3f}", val=f"{val_loss:.3f}" if val_loss else "-", tok_s=f"{tps:,.0f}")
            if step % tc.eval_interval == 0:
                val_loss = evaluate()
                checkpoint(val_loss)
                if not progress:
                    log(f"step {step}: train loss {loss:.4f}, held-out loss {val_loss:.4f}, {elapsed() / 60:.1f} min")
    except KeyboardInterrupt:
        bar.close()
        last = latest_checkpoint(run_dir)
        raise CheckpointError(f"interrupted at step {step}; last checkpoint: {last or 'none'} (continue with --resume {run_dir})") from None
    bar.close()
    if saved_step != step:
        val_loss = evaluate()
        checkpoint(val_loss)
    summary = {"run_dir": str(run_dir), "step": step, "val_loss": val_loss, "minutes": round(elapsed() / 60, 2),
               "params": n_params, "precision": precision}
    if budget_left():  # the loop ended at stop_at
        log(f"paused at step {step} ({fraction():.0%} of the budget), held-out loss {val_loss:.4f}, {elapsed() / 60:.1f} min")
    else:
        log(f"done: step {step}, held-out loss {val_loss:.4f} (sampled windows), {elapsed() / 60:.1f} min; "
            f"run folder {run_dir} (loss curve: {run_dir / 'loss.png'})")
    return summary


def _append(path: Path, row: dict) -> None:
    with open(path, "a") as f:
        f.write(json.dumps(row) + "\n")


def _truncate_metrics(path: Path, step: int) -> None:
    """Drop rows logged after the checkpoint we resume from (they will be logged again)."""
    rows = [r for r in read_metrics(path) if r.get("step", 0) <= step]
    atomic_write_text(path, "".join(json.dumps(r) + "\n" for r in rows))

