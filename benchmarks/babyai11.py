"""A BabyAI-1.1-style imitation learner: the side-by-side baseline of the BabyAI benchmark (issue 12).

Written from the description in Hui et al. 2020, "BabyAI 1.1" (a simplified form of it):

- each cell of the 7x7 egocentric view holds three integers (object, colour, state); each value
  has its own embedding (a bag of words, the three fields in separate ranges) and a cell is the
  sum of its three embeddings;
- two 3x3 convolutions (batch norm, ReLU), then two residual FiLM blocks whose per-channel scale
  and shift come from a GRU reading of the mission words;
- a max-pool over the 7x7 cells gives one vector per step, which an LSTM cell carries across the
  episode's steps (the memory);
- an actor head over the actions (an optional critic head, unused by imitation).

About 1M parameters at the defaults (``dim=128``). It is trained by behaviour cloning on
worldloom's episode folders (cross-entropy on each step's ``policy_label``; truncated
backpropagation through time every ``bptt`` steps) for a wall-clock budget, and evaluated in the
real environment through worldloom's adapter, batched across environments. It is a benchmark,
not part of the package: ``benchmarks/bench_babyai.py --baseline`` runs it beside a world run.
"""

from __future__ import annotations

import math
import re
import time
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from worldloom.errors import DataError

CELL_VALUES = 32  # embedding slots per cell field (MiniGrid uses at most 11); larger values share the last slot
PAD, UNK = 0, 1  # mission word ids


# ----------------------------------------------------------------------------------- missions


def mission_words(text: str) -> list[str]:
    """"go to the red ball" -> ["go", "to", "the", "red", "ball"] (lower case, letters only)."""
    return re.findall(r"[a-z]+", str(text).lower())


class Vocab:
    """Mission words -> ids (0 = padding, 1 = a word not seen when the vocabulary was built)."""

    def __init__(self, missions):
        words = sorted({w for m in missions for w in mission_words(m)})
        self.ids = {w: i + 2 for i, w in enumerate(words)}

    def __len__(self) -> int:
        return len(self.ids) + 2

    def encode(self, missions: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """Missions -> word ids (B, L) padded with PAD, and lengths (B,) (an empty mission is one PAD)."""
        seqs = [[self.ids.get(w, UNK) for w in mission_words(m)] or [PAD] for m in missions]
        ids = torch.full((len(seqs), max(len(s) for s in seqs)), PAD, dtype=torch.long)
        for i, s in enumerate(seqs):
            ids[i, : len(s)] = torch.tensor(s)
        return ids, torch.tensor([len(s) for s in seqs])


# ---------------------------------------------------------------------------------- the agent


class FiLMBlock(nn.Module):
    """conv-BN-ReLU-conv-BN, scaled and shifted per channel by the mission (FiLM), ReLU, plus the input."""

    def __init__(self, dim: int):
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(dim, dim, 3, padding=1), nn.BatchNorm2d(dim)
        self.conv2, self.bn2 = nn.Conv2d(dim, dim, 3, padding=1), nn.BatchNorm2d(dim)
        self.gamma, self.beta = nn.Linear(dim, dim), nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor, instr: torch.Tensor) -> torch.Tensor:
        """x (N, C, H, W), instr (N, C) -> (N, C, H, W)."""
        y = self.bn2(self.conv2(F.relu(self.bn1(self.conv1(x)))))
        y = self.gamma(instr)[:, :, None, None] * y + self.beta(instr)[:, :, None, None]
        return F.relu(y) + x


class BabyAI11(nn.Module):
    """Bag-of-words cells -> convolutions -> 2 FiLM blocks (mission GRU) -> max-pool -> LSTM -> actor."""

    def __init__(self, n_actions: int, n_words: int, dim: int = 128, critic: bool = False):
        super().__init__()
        self.dim = dim
        self.cells = nn.Embedding(3 * CELL_VALUES, dim)
        self.words = nn.Embedding(n_words, dim, padding_idx=PAD)
        self.gru = nn.GRU(dim, dim, batch_first=True)
        self.convs = nn.Sequential(
            nn.Conv2d(dim, dim, 3, padding=1), nn.BatchNorm2d(dim), nn.ReLU(),
            nn.Conv2d(dim, dim, 3, padding=1), nn.BatchNorm2d(dim), nn.ReLU())
        self.films = nn.ModuleList([FiLMBlock(dim), FiLMBlock(dim)])
        self.memory = nn.LSTMCell(dim, dim)
        self.actor = nn.Sequential(nn.Linear(dim, 64), nn.Tanh(), nn.Linear(64, n_actions))
        self.critic = nn.Sequential(nn.Linear(dim, 64), nn.Tanh(), nn.Linear(64, 1)) if critic else None
        self.register_buffer("offsets", torch.arange(3) * CELL_VALUES, persistent=False)

    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def encode_mission(self, ids: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        """Word ids (B, L), lengths (B,) -> the GRU's state after the last word (B, dim)."""
        out, _ = self.gru(self.words(ids))  # (B, L, dim)
        return out[torch.arange(len(ids)), lengths.clamp(min=1) - 1]

    def frames(self, image: torch.Tensor, instr: torch.Tensor) -> torch.Tensor:
        """Views (N, V, V, 3) integers and their missions' vectors (N, dim) -> one vector per view (N, dim)."""
        idx = image.long().clamp(0, CELL_VALUES - 1) + self.offsets  # (N, V, V, 3): each field in its own range
        x = self.cells(idx).sum(3).permute(0, 3, 1, 2)  # (N, V, V, 3, dim) -> (N, V, V, dim) -> (N, dim, V, V)
        x = self.convs(x)
        for film in self.films:
            x = film(x, instr)
        return x.amax(dim=(2, 3))  # max-pool over the cells: (N, dim)

    def zero_memory(self, batch: int) -> tuple[torch.Tensor, torch.Tensor]:
        z = torch.zeros(batch, self.dim, device=self.offsets.device)
        return z, z.clone()

    def step(self, image: torch.Tensor, instr: torch.Tensor, memory) -> tuple[torch.Tensor, tuple]:
        """One step of B episodes: views (B, V, V, 3), missions (B, dim), memory (h, c) each (B, dim)
        -> action logits (B, A) and the new memory."""
        h, c = self.memory(self.frames(image, instr), memory)
        return self.actor(h), (h, c)

    def forward(self, images: torch.Tensor, instr: torch.Tensor, memory=None, valid: torch.Tensor | None = None):
        """T steps of B episodes: views (B, T, V, V, 3), missions (B, dim), memory (h, c) or None (zeros),
        valid (B, T) bool (False = padding; its views are not computed) -> logits (B, T, A), memory.

        The convolutions run once over every valid view of the batch; the LSTM then walks the steps.
        A padded step leaves its episode's memory as it was."""
        B, T = images.shape[:2]
        valid = torch.ones(B, T, dtype=torch.bool, device=images.device) if valid is None else valid
        feats = torch.zeros(B, T, self.dim, device=images.device)
        rows = valid.nonzero(as_tuple=True)  # (b, t) of the valid steps
        feats[rows] = self.frames(images[rows], instr[rows[0]])  # (n_valid, dim) into (B, T, dim)
        h, c = self.zero_memory(B) if memory is None else memory
        logits = []
        for t in range(T):
            h2, c2 = self.memory(feats[:, t], (h, c))
            keep = valid[:, t, None]  # (B, 1)
            h, c = torch.where(keep, h2, h), torch.where(keep, c2, c)
            logits.append(self.actor(h))
        return torch.stack(logits, 1), (h, c)  # (B, T, A)

    def value(self, h: torch.Tensor) -> torch.Tensor:
        """The critic's estimate from the memory (B, dim) -> (B,) (with critic=True; unused by imitation)."""
        if self.critic is None:
            raise ValueError("this agent was built without a critic head (critic=False)")
        return self.critic(h).squeeze(-1)


# ------------------------------------------------------------------------------------ the data


@dataclass
class Demos:
    """Episodes as step arrays: the view each action was taken from and the action to learn.

    ``images`` (N, V, V, 3) holds o_0..o_{T-1} of every episode (the last observation is never
    acted from), ``labels`` (N,) the episodes' ``policy_label`` (-1 = not a policy target, e.g. a
    random action), ``offsets`` (E+1,) where each episode's steps start, ``missions`` (E,) text."""

    images: np.ndarray
    labels: np.ndarray
    offsets: np.ndarray
    missions: list[str]

    @classmethod
    def from_episodes(cls, episodes, field: str = "image") -> "Demos":
        episodes = [ep for ep in episodes if ep.length > 0]
        if not episodes:
            raise DataError("no episode with at least one step to learn from")
        if field not in episodes[0].obs or episodes[0].obs[field].ndim != 4:
            raise DataError(f"the baseline reads a grid view field {field!r} of shape (V, V, 3); "
                             f"these episodes have {sorted(episodes[0].obs)}")
        lengths = np.array([ep.length for ep in episodes])
        return cls(images=np.concatenate([ep.obs[field][:-1] for ep in episodes]),
                   labels=np.concatenate([ep.policy_label for ep in episodes]).astype(np.int64),
                   offsets=np.concatenate([[0], np.cumsum(lengths)]), missions=[ep.mission for ep in episodes])

    def __len__(self) -> int:
        return len(self.missions)

    def batch(self, eps, vocab: Vocab) -> dict:
        """Episodes ``eps`` padded to the longest: images (B, T, V, V, 3) uint8, labels (B, T) (-1 on
        padding), valid (B, T) bool, mission word ids (B, L) and lengths (B,)."""
        lengths = [int(self.offsets[e + 1] - self.offsets[e]) for e in eps]
        B, T = len(eps), max(lengths)
        images = np.zeros((B, T, *self.images.shape[1:]), np.uint8)
        labels = np.full((B, T), -1, np.int64)
        for i, (e, n) in enumerate(zip(eps, lengths)):
            images[i, :n] = self.images[self.offsets[e]: self.offsets[e] + n]
            labels[i, :n] = self.labels[self.offsets[e]: self.offsets[e] + n]
        ids, lens = vocab.encode([self.missions[e] for e in eps])
        valid = torch.arange(T)[None, :] < torch.tensor(lengths)[:, None]  # (B, T)
        return {"images": torch.from_numpy(images), "labels": torch.from_numpy(labels), "valid": valid,
                "ids": ids, "lengths": lens}


# -------------------------------------------------------------------------------- the training


def bc_update(model: BabyAI11, opt: torch.optim.Optimizer, batch: dict, bptt: int = 20, clip: float = 1.0) -> float:
    """One behaviour-cloning update on a batch of whole episodes: cross-entropy on the labelled steps,
    backpropagated through at most ``bptt`` steps (the memory is detached between chunks; the
    gradients of all chunks are summed into one optimizer step). Returns the batch's mean loss."""
    model.train()
    labels, valid = batch["labels"], batch["valid"]
    n = max(int((labels >= 0).sum()), 1)
    opt.zero_grad(set_to_none=True)
    memory, total = None, 0.0
    for s in range(0, labels.shape[1], bptt):
        instr = model.encode_mission(batch["ids"], batch["lengths"])  # per chunk: each chunk's graph is freed
        logits, memory = model(batch["images"][:, s: s + bptt], instr, memory, valid[:, s: s + bptt])
        loss = F.cross_entropy(logits.flatten(0, 1), labels[:, s: s + bptt].flatten(), ignore_index=-1,
                               reduction="sum") / n
        loss.backward()
        total += loss.item()
        memory = tuple(m.detach() for m in memory)
    nn.utils.clip_grad_norm_(model.parameters(), clip)
    opt.step()
    return total


@torch.no_grad()
def bc_loss(model: BabyAI11, demos: Demos, vocab: Vocab, batch_episodes: int = 64) -> float:
    """Mean cross-entropy per labelled step over every episode of ``demos`` (eval mode, no BPTT limit)."""
    model.eval()
    total, n = 0.0, 0
    for i in range(0, len(demos), batch_episodes):
        b = demos.batch(range(i, min(i + batch_episodes, len(demos))), vocab)
        logits, _ = model(b["images"], model.encode_mission(b["ids"], b["lengths"]), None, b["valid"])
        total += float(F.cross_entropy(logits.flatten(0, 1), b["labels"].flatten(), ignore_index=-1, reduction="sum"))
        n += int((b["labels"] >= 0).sum())
    return total / max(n, 1)


def train_bc(model: BabyAI11, demos: Demos, vocab: Vocab, minutes: float, batch_episodes: int = 32, bptt: int = 20,
             lr: float = 1e-3, max_updates: int | None = None, seed: int = 0, log=None) -> dict:
    """Behaviour cloning for ``minutes`` of wall clock (or ``max_updates`` updates, whichever ends
    first): shuffled batches of whole episodes, Adam, learning rate on a cosine over the time
    budget down to a tenth. Returns updates, epochs (passes over the steps), minutes, last loss."""
    opt = torch.optim.Adam(model.parameters(), lr=lr, eps=1e-5)
    rng = np.random.default_rng(seed)
    budget, t0 = max(minutes, 1e-6) * 60, time.perf_counter()
    updates, steps, losses, order = 0, 0, [], np.array([], np.int64)
    while True:
        frac = (time.perf_counter() - t0) / budget
        if frac >= 1 or (max_updates is not None and updates >= max_updates):
            break
        if len(order) == 0:
            order = rng.permutation(len(demos))
        eps, order = order[:batch_episodes], order[batch_episodes:]
        for g in opt.param_groups:
            g["lr"] = lr * (0.1 + 0.45 * (1 + math.cos(math.pi * frac)))
        losses.append(bc_update(model, opt, demos.batch(eps, vocab), bptt))
        updates += 1
        steps += int(sum(demos.offsets[e + 1] - demos.offsets[e] for e in eps))
        if log is not None and updates % 100 == 0:
            log(f"baseline: update {updates}, loss {np.mean(losses[-100:]):.4f}, {frac * minutes:.1f} of {minutes:.1f} min")
    return {"updates": updates, "epochs": round(steps / max(len(demos.labels), 1), 2),
            "minutes": round((time.perf_counter() - t0) / 60, 2),
            "train_loss": float(np.mean(losses[-20:])) if losses else None}


# ------------------------------------------------------------------------------ the evaluation


@torch.no_grad()
def play(model: BabyAI11, vocab: Vocab, adapter, seeds: list[int], envs: int = 64, greedy: bool = False,
         seed: int = 0) -> list[tuple[bool, float, int]]:
    """One episode per seed in the real environment, ``envs`` at a time: (success, return, length) each.
    Success is a positive return, as worldloom's evaluation counts it."""
    model.eval()
    gen = torch.Generator().manual_seed(seed)
    pool = [adapter.make() for _ in range(max(1, min(envs, len(seeds))))]
    out = []
    try:
        for w0 in range(0, len(seeds), len(pool)):
            wave = seeds[w0: w0 + len(pool)]
            obs = [env.reset(seed=int(s))[0] for env, s in zip(pool, wave)]
            instr = model.encode_mission(*vocab.encode([adapter.mission(o) for o in obs]))  # (W, dim)
            h, c = model.zero_memory(len(wave))
            ret, length, done = np.zeros(len(wave)), np.zeros(len(wave), np.int64), np.zeros(len(wave), bool)
            while not done.all():
                alive = np.flatnonzero(~done)
                image = torch.from_numpy(np.stack([adapter.observe(obs[w])["image"] for w in alive]))
                logits, (h[alive], c[alive]) = model.step(image, instr[alive], (h[alive], c[alive]))
                actions = (logits.argmax(-1) if greedy else
                           torch.multinomial(logits.softmax(-1), 1, generator=gen).squeeze(1)).tolist()
                for w, a in zip(alive, actions):
                    obs[w], r, term, trunc, _ = pool[w].step(int(a))
                    ret[w], length[w], done[w] = ret[w] + r, length[w] + 1, term or trunc
            out += [(bool(ret[w] > 0), float(ret[w]), int(length[w])) for w in range(len(wave))]
    finally:
        for env in pool:
            env.close()
    return out


def summary(results: list[tuple[bool, float, int]], seeds: list[int]) -> dict:
    """Success share, mean return and length, in the keys of worldloom's eval.json ``real`` block."""
    return {"episodes": len(results), "success": float(np.mean([r[0] for r in results])),
            "mean_return": float(np.mean([r[1] for r in results])), "mean_length": float(np.mean([r[2] for r in results])),
            "seeds": [int(seeds[0]), int(seeds[-1])]}


def run_baseline(data_dir, env_id: str, seeds: list[int], minutes: float, envs: int = 64, max_updates: int | None = None,
                 seed: int = 0, dim: int = 128, batch_episodes: int = 32, bptt: int = 20, lr: float = 1e-3,
                 log=print) -> dict:
    """Train the baseline on a worldloom episode folder's train split for ``minutes`` and evaluate
    it, sampled and greedy, on ``seeds`` in the real environment. Returns the figures as a dict."""
    from worldloom.world.data.episodes import load_dataset
    from worldloom.world.envs import make_adapter

    ds = load_dataset(data_dir)
    if ds.meta.get("env_id") != env_id:
        raise DataError(f"the episodes in {data_dir} come from {ds.meta.get('env_id')}, not {env_id}")
    train = Demos.from_episodes(ds.episodes("train"))
    val = Demos.from_episodes(ds.episodes("val")) if "val" in ds.splits else None
    vocab = Vocab(train.missions)
    torch.manual_seed(seed)
    model = BabyAI11(int(ds.meta["n_actions"]), len(vocab), dim)
    log(f"baseline: BabyAI-1.1-style agent, {model.num_params():,} parameters, {len(train):,} episodes "
        f"({len(train.labels):,} steps), {minutes:.2f} min of behaviour cloning")
    fit = train_bc(model, train, vocab, minutes, batch_episodes, bptt, lr, max_updates, seed, log)
    adapter = make_adapter(env_id)
    t = time.perf_counter()
    sampled = summary(play(model, vocab, adapter, seeds, envs, greedy=False, seed=seed), seeds)
    greedy = summary(play(model, vocab, adapter, seeds, envs, greedy=True, seed=seed), seeds)
    log(f"baseline: success {sampled['success']:.1%} sampled, {greedy['success']:.1%} greedy on {len(seeds)} held-out seeds")
    return {"agent": "BabyAI-1.1-style (bag-of-words cells, conv, 2 FiLM, max-pool, LSTM), behaviour cloning",
            "params": model.num_params(), "data": str(data_dir), "train_episodes": len(train),
            "train_steps": int(len(train.labels)), "budget_minutes": round(minutes, 2), **fit,
            "val_loss": bc_loss(model, val, vocab) if val is not None else None,
            "real": sampled, "real_greedy": greedy, "eval_seconds": round(time.perf_counter() - t, 1)}
