"""Shared fixtures: a synthetic corpus written by the tests themselves, tiny configs, one trained run.

Nothing here reads ../shared/data: every corpus is generated from a fixed seed, so the
suite runs anywhere and in seconds.
"""

from __future__ import annotations

import os
import random
import shutil
from pathlib import Path

import pytest
import torch
from hypothesis import settings

from worldloom.config import RunConfig, build_config

ROOT = Path(__file__).resolve().parents[1]

# Every `worldloom` or benchmark process a test starts runs on one thread (their `threads=0` reads this): tiny
# models are fastest so, and the suite's two workers (pytest-xdist, one per core) must not ask for four threads.
os.environ["OMP_NUM_THREADS"] = "1"

settings.register_profile("worldloom", deadline=None, database=None)
settings.load_profile("worldloom")

WORDS = ("the a cat dog bird sat ran flew on under over mat log tree and then slowly quickly "
         "big small red blue green café naïve über").split()


def make_corpus(n_chars: int = 20_000, seed: int = 0) -> str:
    """Sentences from a tiny grammar: learnable in tens of steps, a few non-ASCII letters."""
    rng = random.Random(seed)
    out, total = [], 0
    while total < n_chars:
        line = " ".join(rng.choice(WORDS) for _ in range(rng.randint(3, 8))).capitalize() + ".\n"
        out.append(line)
        total += len(line)
    return "".join(out)


# Small enough to train a step in a few milliseconds on one core.
TINY = [
    "model.n_layer=1", "model.d_model=32", "model.n_head=2", "model.context=32",
    "train.batch_size=4", "train.max_steps=8", "train.eval_interval=4", "train.eval_batches=1",
    "train.log_interval=1", "train.warmup_steps=2", "train.precision=fp32", "train.device=cpu",
    "train.threads=1",
]


def tiny_config(data_path, out_dir, name: str = "run", *overrides: str) -> RunConfig:
    """A RunConfig for a tiny fp32 model; later overrides win over the TINY defaults."""
    return build_config(None, [*TINY, f"data.path={data_path}", f"out_dir={out_dir}", f"name={name}", *overrides])


@pytest.fixture(autouse=True)
def _one_thread():
    """Tiny models are fastest on one thread (and the CLI verbs set all cores; undo that)."""
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(1)


@pytest.fixture(scope="session")
def corpus_text() -> str:
    return make_corpus()


@pytest.fixture(scope="session")
def corpus_file(tmp_path_factory, corpus_text) -> Path:
    path = tmp_path_factory.mktemp("data") / "corpus.txt"
    path.write_text(corpus_text, encoding="utf-8")
    return path


@pytest.fixture
def tiny_cfg(corpus_file, tmp_path):
    """tiny_cfg(*overrides, name="run", data=corpus_file) -> RunConfig writing under tmp_path/runs."""

    def make(*overrides: str, name: str = "run", data=None) -> RunConfig:
        return tiny_config(data if data is not None else corpus_file, tmp_path / "runs", name, *overrides)

    return make


TRAINED_STEPS = 80


@pytest.fixture(scope="session")
def trained_run(tmp_path_factory, corpus_file) -> Path:
    """A run trained once per session (GQA, 2 layers); tests that change it use `run_copy`."""
    from worldloom.train import train

    out = tmp_path_factory.mktemp("trained")
    cfg = tiny_config(corpus_file, out, "trained",
                      "model.n_layer=2", "model.d_model=48", "model.n_head=4", "model.n_kv_head=2",
                      "train.batch_size=16", f"train.max_steps={TRAINED_STEPS}", "train.eval_interval=40",
                      "train.lr=0.01", "train.min_lr=0.001", "train.warmup_steps=5")
    train(cfg, progress=False, log=lambda *a: None)
    return cfg.run_dir


@pytest.fixture
def run_copy(trained_run, tmp_path) -> Path:
    """A private copy of the trained run, free to corrupt."""
    dst = tmp_path / "copy"
    shutil.copytree(trained_run, dst)
    return dst


@pytest.fixture(scope="session")
def loaded(trained_run):
    from worldloom.run import load_run

    return load_run(trained_run)


# ---------------------------------------------------------------- world model (BabyAI)

WORLD_ENV = "BabyAI-GoToLocal-v0"
TINY_WORLD = [
    "recipe=world", f"env.id={WORLD_ENV}", "data.episodes=40", "data.val_episodes=12", "data.workers=1",
    "model.n_layer=1", "model.d_model=32", "model.n_head=2", "model.context=256",
    "train.batch_size=4", "train.max_steps=6", "train.eval_interval=3", "train.eval_batches=1",
    "train.log_interval=1", "train.warmup_steps=2", "train.precision=fp32", "train.device=cpu", "train.threads=1",
    "eval.episodes=6", "eval.envs=3", "eval.plan_episodes=2", "eval.transitions=50", "eval.open_loop=4",
]


@pytest.fixture(scope="session")
def world_dataset(tmp_path_factory) -> Path:
    """40 training + 12 validation GoToLocal episodes collected by the bot (about a second)."""
    from worldloom.world.data.collect import collect_dataset

    out = tmp_path_factory.mktemp("world") / "episodes"
    collect_dataset(out, WORLD_ENV, 40, 12, seed=0, workers=1, progress=False, log=lambda *a: None)
    return out


@pytest.fixture(scope="session")
def world_run(tmp_path_factory, world_dataset) -> Path:
    """A tiny world model + policy (with a frame head) trained for a few steps on `world_dataset`."""
    from worldloom.train import train

    out = tmp_path_factory.mktemp("worldrun")
    cfg = build_config(None, [*TINY_WORLD, f"data.path={world_dataset}", f"out_dir={out}", "name=world",
                              "stream.parallel_obs=true"])
    train(cfg, progress=False, log=lambda *a: None)
    return cfg.run_dir


@pytest.fixture(scope="module")
def episodes(world_dataset):
    """The training and validation episodes of `world_dataset`."""
    from worldloom.world.data.episodes import load_dataset

    ds = load_dataset(world_dataset)
    return ds.episodes("train"), ds.episodes("val")


@pytest.fixture(scope="module")
def layout(episodes):
    """A stream layout built from `episodes` (GoToLocal: 7 actions, a grid view)."""
    from worldloom.config import StreamConfig
    from worldloom.tokenize.grid import GridTokenizer
    from worldloom.world.stream import StreamLayout

    return StreamLayout.build([e.mission for e in episodes[0]], 7, StreamConfig(), GridTokenizer())


def run_benchmark(script: str, *args: str, out: Path, timeout: int = 300) -> tuple[dict, str]:
    """Run ``benchmarks/<script> *args --out out`` from the repository root; it must exit 0.
    Returns the JSON it wrote and its stdout (the benchmarks' smoke tests)."""
    import json
    import subprocess
    import sys

    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / script), *args, "--out", str(out)], cwd=ROOT,
                          capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    return json.loads(Path(out).read_text()), proc.stdout


def small_corpus(folder: Path) -> Path:
    """A few hundred short lines of text in folder/corpus.txt (benchmarks' --data in smoke tests)."""
    text = Path(folder) / "corpus.txt"
    text.write_text("".join(f"line {i % 37}: the quick brown fox jumps over the lazy dog.\n" for i in range(400)))
    return text


# ---------------------------------------------------------------- text runs built directly, LoRA adapter runs (export, interop)

SHORT_TEXT = "To be, or not to be, that is the question:\nWhether 'tis nobler in the mind to suffer\n" * 4


def make_text_run(run_dir: Path, *, tie: bool, n_head: int = 4, n_kv_head: int = 0, kind: str = "char", seed: int = 0,
                  **model) -> Path:
    """A text run folder with random O(1) weights (not the 0.02 init, so a wrong mapping shows in the
    logits), saved through the real checkpoint path; no training loop runs."""
    import math

    from worldloom.checkpoint import save_checkpoint
    from worldloom.config import ModelConfig, save_yaml, to_dict
    from worldloom.model import LWM
    from worldloom.tokenize import TextTokenizer

    tok = TextTokenizer.train(kind, SHORT_TEXT, vocab_size=300)
    mc = ModelConfig(n_layer=2, n_head=n_head, n_kv_head=n_kv_head, d_model=32, context=32,
                     tie_weights=tie, vocab_size=tok.vocab_size, **model)
    cfg = RunConfig(name=run_dir.name, out_dir=str(run_dir.parent), model=mc)
    torch.manual_seed(seed)
    m = LWM(mc)
    with torch.no_grad():
        for name, p in m.named_parameters():
            if name.endswith("norm.weight"):
                p.uniform_(0.5, 1.5)
            elif name == "embed.weight":
                p.normal_(0.0, 1.0)
            else:
                p.normal_(0.0, 1.0 / math.sqrt(p.shape[1]))
    save_checkpoint(run_dir, m, None, {"step": 0, "elapsed": 0.0})
    tok.save(run_dir / "tokenizer")
    save_yaml(to_dict(cfg), run_dir / "config.yaml")
    return run_dir


def make_adapter_run(base: Path, run_dir: Path, *, rank: int = 4, alpha: float = 8.0, targets: str | None = None,
                     seed: int = 1):
    """A LoRA run folder on `base`, as `worldloom tune` writes one (config with tune.base, tune.base_hash and
    lora.*; the base's tokenizer; a checkpoint of the adapters only), its B's random so the adapter shows.
    Returns (the folder, the adapted model in memory)."""
    from worldloom.checkpoint import save_checkpoint
    from worldloom.config import from_dict, save_yaml, to_dict
    from worldloom.model import LWM
    from worldloom.run import read_run_config
    from worldloom.tune.base import prepare_tuned, weights_hash

    data = to_dict(read_run_config(base))
    data.update(name=run_dir.name, out_dir=str(run_dir.parent))
    data["tune"].update(base=str(Path(base).resolve()), base_hash=weights_hash(base))
    data["lora"].update(rank=rank, alpha=alpha, **({"targets": targets} if targets else {}))
    cfg = from_dict(RunConfig, data)
    model = LWM(cfg.model)
    prepare_tuned(model, cfg, run_dir)
    torch.manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if ".B." in name:
                p.normal_(0.0, 0.2)
    save_checkpoint(run_dir, model, None, {"step": 1, "elapsed": 0.0})
    shutil.copytree(Path(base) / "tokenizer", run_dir / "tokenizer")
    save_yaml(to_dict(cfg), run_dir / "config.yaml")
    return run_dir, model


def runner_matches_forward(model, layout, ep, steps: int = 3):
    """Feeds EpisodeTokens ``ep`` through a StreamRunner (cached calls, no prefix in the rows fed) and checks its
    policy logits at each of the first ``steps`` steps against one full forward of the same ids. Returns
    (seq, slots, skip, full logits (T, V), P) for further checks."""
    import numpy as np

    from worldloom.world.rollout.runner import StreamRunner

    T, S, L = min(ep.length, steps), layout.step_len, layout.obs_len
    runner = StreamRunner(model, layout)
    got = [runner.logits(runner.reset([ep.prefix], ep.steps[:1, :L]))[0]]
    for t in range(T - 1):
        runner.feed(ep.steps[t : t + 1, L:])
        got.append(runner.logits(runner.feed(ep.steps[t + 1 : t + 2, :L])[:, -1])[0])
    P = len(ep.prefix)
    seq = torch.from_numpy(np.concatenate([ep.prefix, ep.steps[:T].reshape(-1)]))[None]
    slots = torch.zeros_like(seq)
    slots[0, P:] = torch.from_numpy(layout.slots_at(0, T * S))
    skip = torch.from_numpy(layout.skip_ids(seq[0].numpy(), P))[None] if model.skip_proj is not None else None
    with torch.no_grad():
        full = model(seq, slots=slots, skip=skip).logits[0]
    for t in range(T):
        ok = torch.isfinite(got[t])
        torch.testing.assert_close(got[t][ok], full[P + t * S + L - 1][ok], rtol=1e-4, atol=1e-4)
    return seq, slots, skip, full, P
