"""DPO on trajectory preferences of a world run (`worldloom tune dpo WORLD_RUN`).

The same objective as text DPO (``worldloom.losses.align.dpo_loss``), where a "response" is an
episode the policy played and its log-probability the sum of log π(a_t) over the actions it took:

1. **Sample.** The run's policy plays ``wdpo.samples`` episodes (sampled at temperature 1) on
   each of ``wdpo.seeds`` levels of the ``rl`` seed split (never a training, validation or
   evaluation level).
2. **Pair.** On each level: the shortest successful episode is chosen; rejected is a failed one
   if any, otherwise the longest success when it took at least ``wdpo.min_gap`` more steps. A
   level solved by no episode gives no pair.
3. **Reference.** The starting policy's log-probabilities of every paired episode, once, before
   any update (the policy is the reference until the first step: no second model is kept).
4. **Train.** ``wdpo.epochs`` passes over the pairs in minibatches of ``wdpo.batch`` pairs; each
   episode is scored through the stream windows the acting runner saw (``world.rl.build_rollout``),
   and ``wdpo.wm_coef`` (default 1) adds the world-model loss on the same windows so that the
   preference update does not wreck the model's imagination (PPO alone was measured to);
   ``wdpo.sft_coef`` (default 1) adds the chosen episodes' action cross-entropy (RPO): plain DPO
   lowered the chosen episodes' likelihood with the rejected ones' and cut held-out success
   (BENCHMARKS.md).
5. **Compare.** The aligned and the plain policy play the same ``wdpo.eval_episodes`` held-out
   evaluation levels (sampled and greedy); the figures go to ``dpo_eval.json``.

The output is a world run folder (the source's config with the new name, its stream layout, a
checkpoint) that `worldloom eval` and `imagine` accept.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from ..checkpoint import save_checkpoint
from ..config import RunConfig, from_dict, parse_override, save_yaml, to_dict
from ..errors import ConfigError
from ..io import write_json
from ..losses.align import dpo_loss
from ..modality import step_positions
from ..run import CONFIG, load_world_run
from ..runtime import set_threads
from .data.collect import split_seed
from .pipeline import eval_seeds
from .rl import build_rollout, collate, policy_forward
from .rollout.agent import run_episodes
from .task import STREAM_DIR, dataset_dir


@dataclass
class TrajDPOConfig:
    seeds: int = 256  # levels sampled for pairs
    samples: int = 4  # episodes per level
    min_gap: int = 2  # a longer success is rejected only when this many steps longer
    beta: float = 0.1
    lr: float = 5e-5
    epochs: int = 2
    batch: int = 16  # pairs per step
    wm_coef: float = 1.0  # world-model loss on the same windows (0 = preference loss only)
    sft_coef: float = 1.0  # + this x the chosen episodes' action cross-entropy (RPO); 0 = plain DPO, measured to wreck the policy
    envs: int = 64  # environments stepped together
    eval_episodes: int = 500  # held-out levels both policies play
    seed: int = 0

    def __post_init__(self):
        for k in ("seeds", "samples", "epochs", "batch", "envs"):
            if getattr(self, k) < 1 or (k == "samples" and self.samples < 2):
                raise ConfigError(f"wdpo.{k} must be >= {2 if k == 'samples' else 1}, got {getattr(self, k)}")
        if self.beta <= 0 or self.lr <= 0 or self.wm_coef < 0 or self.sft_coef < 0 or self.eval_episodes < 0 or self.min_gap < 1:
            raise ConfigError("wdpo.beta and wdpo.lr must be positive, wdpo.wm_coef, wdpo.sft_coef and wdpo.eval_episodes >= 0, "
                              "wdpo.min_gap >= 1")


def pair_episodes(results, min_gap: int = 2) -> list[tuple[int, int]]:
    """(chosen, rejected) indices into ``results`` (EpisodeResult, grouped by seed; see the module docs)."""
    by_seed: dict[int, list[int]] = {}
    for i, r in enumerate(results):
        by_seed.setdefault(r.seed, []).append(i)
    return [p for idx in by_seed.values() if (p := _pair(results, idx, min_gap)) is not None]


def _pair(results, idx: list[int], min_gap: int) -> tuple[int, int] | None:
    wins = sorted((i for i in idx if results[i].success), key=lambda i: results[i].length)
    fails = [i for i in idx if not results[i].success]
    if not wins:
        return None
    if fails:
        return wins[0], fails[0]
    longest = wins[-1]
    return (wins[0], longest) if results[longest].length - results[wins[0]].length >= min_gap else None


class Scorer:
    """Episodes as stream windows; the summed log π of each episode's actions, with the world-model loss."""

    def __init__(self, model, layout, results):
        mc = model.cfg
        self.model, self.layout = model, layout
        self.ro = build_rollout(layout, results, mc.context, step_positions(layout.step_len, mc.obs_len, mc.obs_vectors),
                                mc.obs_vectors or layout.obs_len)
        self.length = np.bincount(self.ro.episode_of)  # actions per episode
        self.windows: dict[int, list[int]] = {}  # episode -> its windows
        for w, row in enumerate(self.ro.rows):
            self.windows.setdefault(int(self.ro.episode_of[row[4][0]]), []).append(w)

    def logp(self, episodes: list[int], wm: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(summed log π(a) of each episode's actions (E,), the world-model loss or None)."""
        rows = [self.ro.rows[w] for e in episodes for w in self.windows[e]]
        batch = collate(rows, self.layout, wm=wm)
        logits, _, wm_loss = policy_forward(self.model, self.layout, batch, wm=wm)
        idx = batch["samples"]
        lp = torch.log_softmax(logits, -1).gather(-1, self.ro.actions[idx, None]).squeeze(-1)
        where = {e: k for k, e in enumerate(episodes)}
        owner = torch.tensor([where[int(self.ro.episode_of[i])] for i in idx.tolist()])
        return torch.zeros(len(episodes)).index_add(0, owner, lp), wm_loss


def parse_overrides(overrides: list[str]) -> tuple[dict, dict]:
    """`wdpo.key=value`, `name=`, `out_dir=` -> (wdpo dict, run keys); anything else is refused."""
    keys, run = {}, {}
    for text in overrides:
        path, value = parse_override(text)
        if path[0] == "wdpo" and len(path) == 2:
            keys[path[1]] = value
        elif path in (["name"], ["out_dir"]):
            run[path[0]] = value
        else:
            raise ConfigError(f"tune dpo of a world run takes wdpo.<key>, name and out_dir; got '{'.'.join(path)}'")
    return keys, run


def _success(model, run, seeds, cfg: TrajDPOConfig, greedy: bool, progress: bool) -> float:
    res = run_episodes(model, run.layout, run.cfg.env.id, seeds, envs=cfg.envs, greedy=greedy, seed=cfg.seed + 7,
                       progress=progress, desc="eval greedy" if greedy else "eval")
    return float(np.mean([r.success for r in res]))


def train_pairs(scorer: Scorer, pairs, cfg: TrajDPOConfig, progress: bool, log) -> list[dict]:
    """The DPO epochs over the pairs; one metrics row per step."""
    model = scorer.model
    with torch.no_grad():  # the reference: the policy before any update
        ref = {}
        for k in range(0, len(pairs), cfg.batch):
            eps = sorted({e for p in pairs[k : k + cfg.batch] for e in p})
            ref.update(zip(eps, scorer.logp(eps, wm=False)[0].tolist()))
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=cfg.lr, weight_decay=0.0)
    gen = torch.Generator().manual_seed(cfg.seed)
    rows = []
    total = cfg.epochs * -(-len(pairs) // cfg.batch)
    bar = tqdm(total=total, desc="dpo", disable=not progress or None, dynamic_ncols=True)
    for epoch in range(cfg.epochs):
        order = torch.randperm(len(pairs), generator=gen).tolist()
        for k in range(0, len(order), cfg.batch):
            chunk = [pairs[i] for i in order[k : k + cfg.batch]]
            eps = [c for c, _ in chunk] + [r for _, r in chunk]
            lp, wm_loss = scorer.logp(eps, wm=cfg.wm_coef > 0)
            rf = torch.tensor([ref[e] for e in eps])
            B = len(chunk)
            out = dpo_loss(lp[:B], lp[B:], rf[:B], rf[B:], cfg.beta)
            loss = out.total + (cfg.wm_coef * wm_loss if wm_loss is not None else 0.0)
            if cfg.sft_coef:  # RPO: the chosen episodes' actions stay likely while the margin grows
                loss = loss - cfg.sft_coef * lp[:B].sum() / float(sum(scorer.length[c] for c, _ in chunk))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            rows.append({"step": len(rows) + 1, "epoch": epoch, **out.parts, **({"wm": float(wm_loss.detach())} if wm_loss is not None else {})})
            bar.update(1)
            bar.set_postfix(loss=f"{out.parts['loss']:.3f}", acc=f"{out.parts['reward_acc']:.0%}")
    bar.close()
    return rows


def tune_world_dpo(source: Path, overrides: list[str], progress: bool = True, log=print) -> dict:
    """`worldloom tune dpo WORLD_RUN [wdpo.*] name=...`: sample, pair, train, compare; a new world run folder."""
    keys, run_keys = parse_overrides(overrides)
    cfg = from_dict(TrajDPOConfig, keys, prefix="wdpo.")
    run = load_world_run(Path(source))
    set_threads(run.cfg.train.threads)
    new = to_dict(run.cfg)
    new.update(name=run_keys.get("name", f"{run.cfg.name}-dpo"), out_dir=run_keys.get("out_dir", run.cfg.out_dir))
    new["data"]["path"] = str(dataset_dir(run.cfg, run.run_dir))
    out = from_dict(RunConfig, new).run_dir
    if out.exists() and any(out.iterdir()):
        raise ConfigError(f"{out} already exists; choose another name=")
    t0 = time.perf_counter()
    model = run.model.eval()
    seeds = [split_seed("rl", run.cfg.data.seed, i) for i in range(cfg.seeds) for _ in range(cfg.samples)]
    res = run_episodes(model, run.layout, run.cfg.env.id, seeds, envs=cfg.envs, greedy=False, seed=cfg.seed, record=True,
                       progress=progress, desc="sample episodes")
    pairs = pair_episodes(res, cfg.min_gap)
    if not pairs:
        raise ConfigError(f"no level among {cfg.seeds} gave a pair (a success beside a failure or a longer success); "
                          "raise wdpo.seeds or wdpo.samples")
    fails = sum(not res[r].success for _, r in pairs)
    log(f"{len(pairs)} pairs from {cfg.seeds} levels x {cfg.samples} episodes ({fails} against a failure, "
        f"{len(pairs) - fails} against a longer success); sampled success {np.mean([r.success for r in res]):.1%}")
    held_out = eval_seeds(run.cfg, cfg.eval_episodes)
    plain = {"sampled": _success(model, run, held_out, cfg, False, progress), "greedy": _success(model, run, held_out, cfg, True, progress)} if held_out else {}
    steps = train_pairs(Scorer(model, run.layout, res), pairs, cfg, progress, log)
    model.eval()
    aligned = {"sampled": _success(model, run, held_out, cfg, False, progress), "greedy": _success(model, run, held_out, cfg, True, progress)} if held_out else {}
    out.mkdir(parents=True, exist_ok=True)
    run.layout.save(out / STREAM_DIR)
    save_yaml(new, out / CONFIG)
    save_checkpoint(out, model, None, {"step": len(steps), "elapsed": time.perf_counter() - t0, "precision": "fp32"})
    result = {"source": str(source), "pairs": len(pairs), "pairs_vs_failure": fails, "eval_episodes": cfg.eval_episodes,
              "plain": plain, "aligned": aligned, "minutes": round((time.perf_counter() - t0) / 60, 2), "wdpo": asdict(cfg),
              "last_step": steps[-1] if steps else {}}
    write_json(out / "dpo_eval.json", result)
    (out / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in steps))
    if held_out:
        log(f"held-out levels ({cfg.eval_episodes}): success sampled {plain['sampled']:.1%} -> {aligned['sampled']:.1%}, "
            f"greedy {plain['greedy']:.1%} -> {aligned['greedy']:.1%}; run folder {out}")
    return {"run_dir": str(out), **result}
