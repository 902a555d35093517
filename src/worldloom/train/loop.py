"""The training loop for every recipe, read top to bottom.

    setup:   config -> run folder -> task (data + tokenizers) -> model -> AdamW
    restore: weights, optimizer moments, step, elapsed time, data and dropout RNG states
    loop:    train_step (micro-batches: model(**inputs) -> task.objective -> backward) -> log
             -> every eval_interval steps: evaluate_and_save
    finish:  a last evaluation and checkpoint if the last step was not saved

A *task* (``worldloom.train.task.Task``) owns what differs between recipes; the recipe registry
(``worldloom.recipes``) says which task a config trains. The model is called through its
``forward`` only, so ``train.compile=true`` compiles exactly what the steps run.

Resuming reloads the resolved config, the tokenizer, the weights, the optimizer moments and
every RNG state, so that a resumed run continues the exact sequence of the uninterrupted one
(the test suite checks it bit for bit in fp32). With a binding train.max_minutes the schedule
follows the clock, read at checkpoints only (``Trainer.clock``): a resumed run replays the killed
one exactly up to the next checkpoint, and follows its own clock after. Under torchrun only rank 0 (``Dist.main``)
logs and writes the run folder.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch
from tqdm import tqdm

from ..checkpoint import latest_checkpoint, load_model_weights, load_optimizer, read_state, rng_from_json, rng_to_json, save_checkpoint
from ..config import RunConfig, apply_overrides, from_dict, save_yaml, to_dict
from ..errors import CheckpointError, ConfigError
from ..memory import check_fits
from ..model import LWM, model_inputs
from ..recipes import get_recipe
from ..run import CONFIG, METRICS, read_run_config
from ..runtime import autocast, resolve_device, resolve_precision, set_threads
from . import dist as D
from .dist import Dist
from .optim import lr_at, make_optimizer
from .plots import plot_loss, truncate_metrics
from .task import Task


@dataclass
class Trainer:
    """Everything one training run holds between steps."""

    cfg: RunConfig  # resolved: the model sizes the task implies are filled in
    run_dir: Path
    task: Task
    model: LWM  # the module whose weights are saved (sharded in place under FSDP)
    net: torch.nn.Module  # what a step calls: the model, DDP around it, and/or compiled
    optimizer: torch.optim.Optimizer
    gen: torch.Generator  # the data order
    precision: str
    device: torch.device
    dist: Dist
    step: int = 0
    saved_step: int | None = None  # the step of the newest checkpoint on disk
    val_loss: float | None = None
    t_start: float = 0.0  # perf_counter() at which this run's elapsed time was 0
    clock: dict = field(default_factory=dict)  # at the last checkpoint: step "at", "seconds" used, "per_step" since the one before

    def elapsed(self) -> float:
        return time.perf_counter() - self.t_start

    def fraction(self) -> float:
        """Share of the budget used: steps or minutes, whichever is further along. Between checkpoints the
        minutes are extrapolated from the clock saved at the last one (before the first: the clock itself),
        so a resumed run replays the learning rates of the run it continues."""
        tc = self.cfg.train
        f = self.step / tc.max_steps
        if not tc.max_minutes:
            return f
        c = self.clock
        seconds = c["seconds"] + (self.step - c["at"]) * c["per_step"] if c else self.elapsed()
        return max(f, seconds / (tc.max_minutes * 60))

    def sync_clock(self) -> float:
        """Give every rank rank 0's elapsed time, so that all agree on the schedule and on when to stop."""
        if self.dist.world > 1:
            t = torch.tensor([self.elapsed()], dtype=torch.float64)
            torch.distributed.broadcast(t, src=0)
            self.t_start = time.perf_counter() - float(t.item())
            return float(t.item())
        return self.elapsed()

    def budget_left(self) -> bool:
        tc = self.cfg.train
        return self.step < tc.max_steps and not (tc.max_minutes and self.elapsed() >= tc.max_minutes * 60)


def resume_config(run_dir: Path, overrides: list[str]) -> RunConfig:
    """The saved config of a run, with `train.*` overrides (e.g. a longer max_steps)."""
    cfg = read_run_config(run_dir)
    bad = [o for o in overrides if not o.split("=", 1)[0].startswith("train.")]
    if bad:
        raise ConfigError(f"only train.* keys can change on --resume (got {bad[0]!r}); start a new run to change the rest")
    data = to_dict(cfg)
    apply_overrides(data, overrides)
    return from_dict(RunConfig, data)


def open_run(cfg: RunConfig | None, resume: Path | None, overrides: list[str]) -> tuple[RunConfig, Path, Path | None]:
    """(config, run folder, checkpoint to resume from or None). Exactly one of cfg / resume is given."""
    if resume is not None:
        run_dir = Path(resume)
        cfg = resume_config(run_dir, list(overrides))
        ckpt = latest_checkpoint(run_dir)
        if ckpt is None:
            raise CheckpointError(f"cannot resume: {run_dir} holds no checkpoint yet; start it again without --resume")
        return cfg, run_dir, ckpt
    if latest_checkpoint(cfg.run_dir) is not None:
        raise ConfigError(f"run folder {cfg.run_dir} already holds a checkpoint; continue it with --resume {cfg.run_dir} "
                          "or choose another name=...")
    return cfg, cfg.run_dir, None


def setup(cfg: RunConfig | None, resume: Path | None, overrides: list[str]) -> tuple[Trainer, Path | None, dict]:
    """A Trainer ready to step: model initialised from train.seed (or a checkpoint's weights), wrapped
    for the process group, optimizer; returns it with the checkpoint to restore and its state."""
    cfg, run_dir, ckpt = open_run(cfg, resume, overrides)
    tc = cfg.train
    set_threads(tc.threads)
    device = resolve_device(tc.device)
    dist = D.init(tc.dist, device)
    state = read_state(ckpt) if ckpt else {}
    if state.get("packed"):  # a quantised run's weights: never trained further in full precision
        from ..quant import refuse_packed

        refuse_packed(cfg, run_dir, state)
    if ckpt and tc.max_steps < state["step"]:  # before anything is written: config.yaml must agree with the checkpoint
        raise ConfigError(f"{run_dir} has reached step {state['step']}; train.max_steps={tc.max_steps} would end it in the past "
                          f"(give train.max_steps >= {state['step']}; nothing was changed)")
    precision = state.get("precision") or D.agree(resolve_precision(tc.precision, device), ("fp32", "bf16", "fp16"), dist)
    task = get_recipe(cfg.recipe).make_task(cfg, run_dir, ckpt is not None)  # data and tokenizers (training part only)
    cfg = replace(cfg, model=replace(cfg.model, **task.model_sizes()))
    build = get_recipe(cfg.recipe).build_model
    if build is None:
        check_fits(cfg, device)  # a one-line refusal instead of an allocator traceback
    torch.manual_seed(tc.seed)
    model = build(cfg) if build else LWM(cfg.model)
    if hasattr(task, "prepare_model"):  # tuning recipes: the base run's weights, adapters, frozen layers
        task.prepare_model(model)
    model = model.to(device)
    if ckpt:
        load_model_weights(model, ckpt)  # whole weights, before any sharding
    net = D.wrap(model, dist, device)
    optimizer = make_optimizer(model, tc)  # after sharding: FSDP's parameters are DTensors
    if ckpt:
        load_optimizer(optimizer, ckpt, state, D.shard_optimizer_state if dist.sharded else None)
    if tc.compile:
        net = torch.compile(net)  # the same parameters; steps and evaluation call `net`
    tr = Trainer(cfg, run_dir, task, model, net, optimizer, torch.Generator().manual_seed(tc.seed), precision, device, dist)
    return tr, ckpt, state


def restore(tr: Trainer, ckpt: Path | None, state: dict) -> None:
    """Restore step, clock and RNG states from the checkpoint, or prepare a new run folder; then save
    the resolved config."""
    if ckpt:
        tr.step = tr.saved_step = state["step"]
        tr.val_loss = state.get("val_loss")
        tr.clock = dict(state.get("clock") or {})
        tr.gen.set_state(rng_from_json(state["data_rng"]))
        torch.set_rng_state(rng_from_json(state["torch_rng"]))
    tr.t_start = time.perf_counter() - state.get("elapsed", 0.0)
    if not tr.dist.main:
        return
    if ckpt:
        truncate_metrics(tr.run_dir / METRICS, tr.step)
    else:
        tr.run_dir.mkdir(parents=True, exist_ok=True)
        (tr.run_dir / METRICS).unlink(missing_ok=True)
        tr.task.save(tr.run_dir)
    save_yaml(to_dict(tr.cfg), tr.run_dir / CONFIG)


def train_step(tr: Trainer, lr: float) -> tuple[float, dict, int]:
    """One optimizer step over train.grad_accum micro-batches: (mean cross-entropy, other parts' means, tokens)."""
    tc = tr.cfg.train
    for group in tr.optimizer.param_groups:
        group["lr"] = lr
    if hasattr(tr.task, "before_step"):  # a staged task (a talk run's vision prefix: backbone frozen in stage 1)
        tr.task.before_step(tr.model, tr.step)
    loss_sum, extra, tokens = 0.0, {}, 0
    shard = D.shard_sequence if tr.cfg.model.attention == "ring" else D.shard_rows
    for _ in range(tc.grad_accum):
        batch = shard(tr.task.batch(tc.batch_size, tr.gen), tr.dist)  # this rank's share of the global batch
        scale = float(batch.pop("loss_scale", 1.0))
        batch = {k: v.to(tr.device) for k, v in batch.items()}
        tokens += (tr.task.count(batch) if hasattr(tr.task, "count") else batch["input"].numel()) * tr.dist.world
        with autocast(tr.precision, tr.device):
            out = tr.task.objective(tr.net(**model_inputs(batch)), batch)
        (out.total * (scale / tc.grad_accum)).backward()
        loss_sum += scale * out.parts.get("loss", out.total.item())  # the cross-entropy, comparable to held-out loss
        for k, v in out.parts.items():  # other parts (e.g. moe_aux) are logged as their micro-batch mean
            if k != "loss" and isinstance(v, (int, float)):
                extra[k] = extra.get(k, 0.0) + v / tc.grad_accum
    if tc.grad_clip > 0:
        torch.nn.utils.clip_grad_norm_(tr.model.parameters(), tc.grad_clip)
    tr.optimizer.step()
    tr.optimizer.zero_grad(set_to_none=True)
    tr.step += 1
    return D.all_mean(loss_sum / tc.grad_accum, tr.dist), extra, tokens


def evaluate_and_save(tr: Trainer) -> float:
    """Held-out loss (logged, plotted) and a checkpoint at the current step."""
    tr.val_loss = tr.task.val_loss(tr.net, tr.precision, tr.device)  # every rank: FSDP's forward is collective
    weights, moments = tr.model, tr.optimizer
    if tr.dist.sharded:  # gathered whole on every rank (collective), written by rank 0
        weights, moments = D.full_model_state(tr.model), D.full_optimizer_state(tr.optimizer)
    if tr.cfg.train.max_minutes:  # the schedule's clock from here to the next checkpoint
        now, at, before = tr.sync_clock(), tr.clock.get("at", 0), tr.clock.get("seconds", 0.0)
        tr.clock = {"at": tr.step, "seconds": now, "per_step": (now - before) / max(tr.step - at, 1)}
    if tr.dist.main:
        _append(tr.run_dir / METRICS, {"step": tr.step, "val_loss": tr.val_loss, "elapsed": round(tr.elapsed(), 2)})
        plot_loss(tr.run_dir / METRICS, tr.run_dir / "loss.png", title=f"{tr.cfg.name}: {tr.model.num_params() / 1e6:.1f}M params")
        save_checkpoint(tr.run_dir, weights, moments, {
            "step": tr.step, "elapsed": tr.elapsed(), "precision": tr.precision, "val_loss": tr.val_loss, "clock": tr.clock,
            "data_rng": rng_to_json(tr.gen.get_state()), "torch_rng": rng_to_json(torch.get_rng_state()),
        })
    tr.saved_step = tr.step
    return tr.val_loss


def train(cfg: RunConfig | None = None, resume: Path | None = None, overrides: list[str] = (), progress: bool = True, log=print,
          stop_at: float = 1.0) -> dict:
    """Train (or resume) a run and return its summary. Exactly one of cfg / resume is given.

    ``stop_at`` < 1 pauses the run (checkpoint saved) once that fraction of its budget is used;
    resuming it continues the same learning-rate schedule."""
    tr, ckpt, state = setup(cfg, resume, overrides)
    restore(tr, ckpt, state)
    say = log if tr.dist.main else (lambda *a: None)
    n_params = tr.model.num_params()
    trained = sum(p.numel() for p in tr.model.parameters() if p.requires_grad)
    frozen = f" ({trained:,} trained, the rest frozen)" if trained < n_params else ""
    say(f"run {tr.run_dir}: {n_params / 1e6:.2f}M parameters{frozen}, {tr.task.describe()}, {tr.device} {tr.precision}"
        + (f", resuming at step {tr.step}" if ckpt else ""))
    tc = tr.cfg.train
    bar = _Progress(progress and tr.dist.main, tr.fraction())
    tr.net.train()
    t_log, tokens_since = time.perf_counter(), 0
    try:
        while True:
            tr.sync_clock()
            if not (tr.budget_left() and tr.fraction() < stop_at):
                break
            lr = lr_at(tr.step, tr.fraction(), tc)
            loss, extra, tokens = train_step(tr, lr)
            tokens_since += tokens
            if tr.step % tc.log_interval == 0:
                now = time.perf_counter()
                tps = tokens_since / (now - t_log)
                t_log, tokens_since = now, 0
                if tr.dist.main:
                    ranks = {"ranks": tr.dist.world} if tr.dist.world > 1 else {}
                    _append(tr.run_dir / METRICS, {"step": tr.step, "loss": loss, **extra, "lr": lr, "tokens_per_s": round(tps, 1),
                                                   **ranks, "elapsed": round(tr.elapsed(), 2)})
                bar.update(tr.fraction(), step=tr.step, loss=f"{loss:.3f}", val=f"{tr.val_loss:.3f}" if tr.val_loss else "-",
                           tok_s=f"{tps:,.0f}")
            if tr.step % tc.eval_interval == 0:
                evaluate_and_save(tr)
                if not progress:
                    say(f"step {tr.step}: train loss {loss:.4f}, held-out loss {tr.val_loss:.4f}, {tr.elapsed() / 60:.1f} min")
    except KeyboardInterrupt:
        bar.close()
        last = latest_checkpoint(tr.run_dir)
        raise CheckpointError(f"interrupted at step {tr.step}; last checkpoint: {last or 'none'} (continue with --resume {tr.run_dir})") from None
    bar.close()
    if tr.saved_step != tr.step:
        evaluate_and_save(tr)
    D.barrier(tr.dist)  # every rank leaves once rank 0 has written the last checkpoint
    return _finish(tr, say, stop_at)


def _finish(tr: Trainer, say, stop_at: float = 1.0) -> dict:
    """The summary of a run that stopped (budget spent or paused at stop_at), said in one line."""
    if stop_at < 1.0 and tr.budget_left() and tr.fraction() < 1.0:  # the loop ended at stop_at (a schedule at its
        # end is done, also when one of the clocks -- the wall clock, or the one extrapolated from the last
        # checkpoint -- reached max_minutes before the other did; a run without stop_at is never paused)
        say(f"paused at step {tr.step} ({tr.fraction():.0%} of the budget), held-out loss {tr.val_loss:.4f}, "
            f"{tr.elapsed() / 60:.1f} min")
    else:
        say(f"done: step {tr.step}, held-out loss {tr.val_loss:.4f}, {tr.elapsed() / 60:.1f} min; "
            f"run folder {tr.run_dir} (loss curve: {tr.run_dir / 'loss.png'})")
    return {"run_dir": str(tr.run_dir), "step": tr.step, "val_loss": tr.val_loss, "minutes": round(tr.elapsed() / 60, 2),
            "params": tr.model.num_params(), "precision": tr.precision}


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


def _append(path: Path, row: dict) -> None:
    with open(path, "a") as f:
        f.write(json.dumps(row) + "\n")
