"""PPO on text runs (RLHF): `worldloom tune ppo TEXT_RUN data.path=PROMPTS.jsonl reward=checker|RM_RUN`.

The "environment" is "write a completion to a prompt, receive a reward": an episode is one
response, an action one token. The PPO core is ``worldloom.rl`` (the same as world runs' PPO,
``worldloom.world.rl``); the run folder, resume and the update loop are ``worldloom.rl.runs``.

One update:

1. **Sample.** ``rl.batch`` prompt rows (drawn by the run's own generator), written with the
   run's chat template (``tune.prompt_format``), are completed at temperature 1 — batched,
   left-padded, with the KV cache (``worldloom.decode.generate_ids``) — until ``tune.stop`` or
   ``rl.max_new_tokens``. A response's tokens include the one that completes the stop text.
2. **Reward.** ``worldloom.tune.rewards``: the checker (1 right / 0 wrong) or a reward model's
   scalar, on the answer (the text before the stop); minus ``rl.no_stop_penalty`` for a
   response that never stopped.
3. **Score.** One forward of the policy and of the frozen **reference** (the starting model:
   with LoRA the same model with its adapters disabled, no second copy; otherwise a frozen
   copy of it) over prompt + response gives, at every response token, log π(y_t), the exact
   entropy and KL(π ‖ π_ref) over the whole vocabulary (``categorical_terms``) and V(s_t) from a
   ``ValueHead`` on the hidden state. Per-token rewards, InstructGPT / TRL style:

       r_t = −rl.kl_reward · (log π(y_t) − log π_ref(y_t))  [+ the sequence's reward at its last token]

   The KL penalty lives in the reward (``rl.kl_reward`` 0.05); the loss's own KL term
   (``rl.kl_coef``) defaults to 0. GAE over each response (γ = ``rl.gamma`` 1, λ = 0.95), the
   response's last token being the end of its episode.
4. **PPO epochs** over minibatches of whole responses (at least ``rl.minibatch`` response
   tokens each; ``ppo_loss``, advantages whitened per minibatch: ``rl.norm_adv``), stopping
   early once the approximate KL to the sampling policy passes ``rl.target_kl``. Rewards are
   used as they come (TRL's default): a reward model's scale counts against ``rl.kl_reward``.

Metrics per update (``metrics.jsonl``): reward, accuracy (checker), ``kl`` (exact KL to the
reference per response token, under the sampling policy) and ``kl_seq`` (per response),
entropy, clipfrac, approx_kl, response length, share of responses that stopped, seconds.
At the end, with ``rl.eval_path``, greedy answers to those rows are scored: ``eval.json``.

A tuned PPO run is a text run folder (``config.yaml`` of the source with its new name and
``tune.base``/``tune.base_hash``, the tokenizer, checkpoints; a LoRA run keeps only its
adapters), so `load_run`, `generate` and `eval` read it; ``value.safetensors`` beside the
weights, ``rl.yaml`` with the reward and ``rl.*``. It runs in fp32 on the CPU, in eval mode
(no dropout: the ratio is exactly 1 before the first step), and resumes (``--resume RUN``)
the same sequence as a run never stopped.
"""

from __future__ import annotations

import copy
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from ..adapters.lora import disabled, has_lora
from ..checkpoint import latest_checkpoint, save_checkpoint
from ..config import RunConfig, from_dict, save_yaml, to_dict
from ..decode import SamplingConfig, generate_ids
from ..errors import ConfigError
from ..io import load_tensors, write_json
from ..model import LWM
from ..rl import PPOConfig, ValueHead, categorical_terms, gae, ppo_loss
from ..rl.runs import (RL_FILE, VALUE, METRICS, minibatch_groups, parse_rl_overrides, ppo_epochs, read_rl_file,
                       restore_rng, resume_optimizer, rng_state, run_updates, trim_metrics)
from ..run import CONFIG, TOKENIZER_DIR, load_run, read_run_config
from ..runtime import set_threads
from .rewards import Reward, make_reward

RECIPE = "ppo"  # worldloom.recipes.ppo: load_run, generate and eval read its folders
EVAL = "eval.json"


@dataclass
class TextRLConfig(PPOConfig):
    """The ``rl.*`` keys of `worldloom tune ppo TEXT_RUN`: the PPO settings (text defaults) and the sampling."""

    updates: int = 100  # PPO updates (each: sample, reward, score, epochs)
    max_minutes: float = 0.0  # wall-clock budget (0 = none): no update starts after it
    batch: int = 16  # prompts completed per update
    max_new_tokens: int = 32  # response length limit
    seed: int = 0  # the RL generator: prompts, sampling seeds, minibatch order; value-head and adapter init
    kl_reward: float = 0.05  # per-token KL penalty to the reference, in the reward
    no_stop_penalty: float = 0.0  # subtracted from the reward of a response that never reached tune.stop
    eval_path: str = ""  # held-out prompt rows scored with greedy answers at the end (eval.json); "" = none
    checkpoint_every: int = 1  # updates between checkpoints (the last update always saves)
    kl_coef: float = 0.0  # the loss's KL term (the penalty is in the reward instead: rl.kl_reward)
    ent_coef: float = 0.0
    gamma: float = 1.0
    value_warmup: int = 0
    minibatch: int = 64  # response tokens per gradient step (whole responses)
    group: int = 1  # samples per prompt (rl.batch counts samples); > 1: each reward minus its group's other samples' mean (RLOO)

    def __post_init__(self):
        super().__post_init__()
        if self.group < 1 or self.batch % self.group:
            raise ConfigError(f"rl.group must be >= 1 and divide rl.batch ({self.batch}), got {self.group}")
        for name in ("updates", "batch", "max_new_tokens", "checkpoint_every"):
            if getattr(self, name) < 1:
                raise ConfigError(f"rl.{name} must be >= 1, got {getattr(self, name)}")
        for name in ("max_minutes", "seed", "kl_reward", "no_stop_penalty"):
            if getattr(self, name) < 0:
                raise ConfigError(f"rl.{name} must be >= 0, got {getattr(self, name)}")


# ---------------------------------------------------------------- pure pieces: rewards per token, GAE per response


def group_baseline(scores: torch.Tensor, group: int) -> torch.Tensor:
    """Scores (N,) of N/group prompts sampled ``group`` times each (consecutive) -> each minus the mean of the
    other samples of its prompt (the leave-one-out baseline of RLOO, Ahmadian et al. 2024)."""
    if group == 1:
        return scores
    g = scores.float().view(-1, group)
    return ((g - (g.sum(1, keepdim=True) - g) / (group - 1))).view(-1)


def token_rewards(logp: torch.Tensor, ref_logp: torch.Tensor, scores: torch.Tensor, lengths: list[int],
                  kl_reward: float) -> torch.Tensor:
    """Flat response tokens (M,) of sequences of ``lengths`` -> r_t = −kl_reward·(log π − log π_ref), plus each
    sequence's score (N,) at its last token."""
    r = -kl_reward * (logp - ref_logp).float()
    ends = torch.tensor(lengths).cumsum(0) - 1
    r[ends] += scores.float()
    return r


def response_gae(rewards: torch.Tensor, values: torch.Tensor, lengths: list[int], gamma: float, lam: float):
    """GAE over each response (flat (M,) rewards and values, sequences of ``lengths``; a response's last token
    ends its episode) -> flat (advantages, returns)."""
    N, T = len(lengths), max(lengths)
    seq = torch.repeat_interleave(torch.arange(N), torch.tensor(lengths))  # (M,) sequence of each token
    t = torch.cat([torch.arange(n) for n in lengths])  # (M,) its place in the response
    r, v = torch.zeros(T, N), torch.zeros(T, N)  # time-major, as gae takes them
    r[t, seq], v[t, seq] = rewards.float(), values.float()
    dones = torch.ones(T, N, dtype=torch.bool)
    dones[t, seq] = t == torch.tensor(lengths)[seq] - 1  # the last token ends it; padding after it counts as ended
    adv, ret = gae(r, v, dones, torch.zeros(N), gamma, lam)
    return adv[t, seq], ret[t, seq]


def pack(prompts: list[list[int]], responses: list[list[int]]):
    """Prompt + response ids -> right-padded ids (B, L), the flat positions b·L + i whose logits predict each
    response token (M,), and those tokens (M,); tokens in sequence order."""
    B, L = len(prompts), max(len(p) + len(r) for p, r in zip(prompts, responses))
    ids = torch.zeros(B, L, dtype=torch.long)
    pos, tok = [], []
    for b, (p, r) in enumerate(zip(prompts, responses)):
        ids[b, : len(p) + len(r)] = torch.tensor(p + r)
        pos.extend(b * L + len(p) - 1 + j for j in range(len(r)))
        tok.extend(r)
    return ids, torch.tensor(pos), torch.tensor(tok)


def policy_terms(model, ids: torch.Tensor, pos: torch.Tensor):
    """(logits (M, V) over the whole vocabulary, hidden states (M, C)) at the flat positions ``pos``."""
    h = model(ids, head=False).hidden.flatten(0, 1)[pos]  # (B, L, C) -> (M, C)
    return model.logits_of(h).float(), h


class Reference:
    """The frozen starting model: with LoRA the policy with its adapters disabled, else a frozen copy."""

    def __init__(self, model, weights: dict | None = None):
        self.copy = None if has_lora(model) else copy.deepcopy(model).eval().requires_grad_(False)
        if self.copy is not None and weights is not None:  # resuming: the starting weights, not the current ones
            self.copy.load_state_dict(weights, strict=False)
        self.model = model

    @torch.no_grad()
    def logits(self, ids: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
        if self.copy is not None:
            return policy_terms(self.copy, ids, pos)[0]
        with disabled(self.model):
            return policy_terms(self.model, ids, pos)[0]


# ---------------------------------------------------------------- one update: sample, reward, score, epochs


@dataclass
class Rollout:
    rows: list[dict]
    prompts: list[list[int]]  # prompt ids (the chat template applied)
    responses: list[list[int]]  # response ids, the stop text's included when it came
    answers: list[str]  # the text before the stop
    stopped: list[bool]
    scores: torch.Tensor  # (N,) the sequence rewards (after the no-stop penalty)
    raw: torch.Tensor  # (N,) the Reward's scores

    @property
    def lengths(self) -> list[int]:
        return [len(r) for r in self.responses]


def complete(model, tokenizer, prompts: list[list[int]], stop: str, max_new: int, temperature: float,
             seed: int) -> tuple[list[list[int]], list[str], list[bool]]:
    """Batched completions with the KV cache -> (response ids, answers before the stop, whether each stopped)."""
    sc = SamplingConfig(max_new_tokens=max_new, temperature=temperature, seed=seed)
    out: list[list[int]] = [[] for _ in prompts]
    answers: list[str | None] = [None] * len(prompts)
    for nxt in generate_ids(model, prompts, sc):
        for i, t in enumerate(nxt.tolist()):
            if answers[i] is None:
                out[i].append(t)
                text = tokenizer.decode(out[i])
                if stop in text:
                    answers[i] = text[: text.index(stop)]
        if all(a is not None for a in answers):
            break
    stopped = [a is not None for a in answers]
    return out, [a if a is not None else tokenizer.decode(o) for a, o in zip(answers, out)], stopped


def rollout(tu: "Tuner", pick: list[int], seed: int) -> Rollout:
    cfg = tu.cfg
    rows, prompts = [tu.rows[i] for i in pick], [tu.prompt_ids[i] for i in pick]
    responses, answers, stopped = complete(tu.model, tu.tokenizer, prompts, tu.run_cfg.tune.stop, cfg.max_new_tokens,
                                           1.0, seed)
    raw = tu.reward.score(rows, answers).float()
    scores = raw - cfg.no_stop_penalty * (~torch.tensor(stopped)).float()
    return Rollout(rows, prompts, responses, answers, stopped, scores, raw)


@dataclass
class Scored:
    old_logp: torch.Tensor  # (M,) every response token, in sequence order
    ref_logits: torch.Tensor  # (M, V)
    old_values: torch.Tensor  # (M,)
    advantages: torch.Tensor  # (M,)
    returns: torch.Tensor  # (M,)
    kl: torch.Tensor  # (M,) exact KL(π ‖ π_ref) over the vocabulary
    entropy: torch.Tensor  # (M,)


@torch.no_grad()
def score(tu: "Tuner", ro: Rollout) -> Scored:
    """The policy's and the reference's view of every response token before the update, then GAE."""
    ids, pos, tok = pack(ro.prompts, ro.responses)
    logits, h = policy_terms(tu.model, ids, pos)
    ref_logits = tu.reference.logits(ids, pos)
    logp, entropy, kl = categorical_terms(logits, ref_logits, tok)
    ref_logp = torch.log_softmax(ref_logits, -1).gather(-1, tok[:, None]).squeeze(-1)
    values = tu.value_head(h)
    rewards = token_rewards(logp, ref_logp, group_baseline(ro.scores, tu.cfg.group), ro.lengths, tu.cfg.kl_reward)
    adv, ret = response_gae(rewards, values, ro.lengths, tu.cfg.gamma, tu.cfg.lam)
    return Scored(logp, ref_logits, values, adv, ret, kl, entropy)


def epochs(tu: "Tuner", ro: Rollout, sc: Scored, value_only: bool) -> dict:
    """The PPO epochs of one update over minibatches of whole responses."""
    cfg, lengths = tu.cfg, ro.lengths
    starts = [0, *torch.tensor(lengths).cumsum(0).tolist()]

    def minibatch_loss(group: list[int]):
        ids, pos, tok = pack([ro.prompts[i] for i in group], [ro.responses[i] for i in group])
        idx = torch.cat([torch.arange(starts[i], starts[i + 1]) for i in group])  # their tokens in the flat order
        with torch.set_grad_enabled(not value_only):
            logits, h = policy_terms(tu.model, ids, pos)
        values = tu.value_head(h if cfg.value_backbone and not value_only else h.detach())
        logp, ent, kl = categorical_terms(logits, sc.ref_logits[idx], tok)
        out = ppo_loss(logp, sc.old_logp[idx], sc.advantages[idx], values, sc.old_values[idx], sc.returns[idx],
                       ent, kl, cfg, value_only=value_only)
        return out.total, out.parts

    return ppo_epochs(lambda: minibatch_groups(lengths, cfg.minibatch, tu.gen), minibatch_loss, tu.opt, cfg, value_only)


def one_update(tu: "Tuner") -> dict:
    """Sample, reward, score, PPO epochs; the metrics row of this update."""
    cfg, t0 = tu.cfg, time.perf_counter()
    pick = [i for i in torch.randint(len(tu.rows), (cfg.batch // cfg.group,), generator=tu.gen).tolist() for _ in range(cfg.group)]
    ro = rollout(tu, pick, int(torch.randint(2**31 - 1, (1,), generator=tu.gen)))
    sc = score(tu, ro)
    value_only = tu.update < cfg.value_warmup
    parts = epochs(tu, ro, sc, value_only)
    tu.update += 1
    per_seq = torch.tensor([float(k.sum()) for k in sc.kl.split(ro.lengths)])
    row = {"update": tu.update, "reward": float(ro.scores.mean()),
           **({"accuracy": float(ro.raw.mean())} if tu.reward.exact else {}),
           **{f"loss_{k}" if k in ("kl", "entropy") else k: v for k, v in parts.items()},
           "kl": float(sc.kl.mean()), "kl_seq": float(per_seq.mean()), "entropy": float(sc.entropy.mean()),
           "length": sum(ro.lengths) / len(ro.lengths), "stopped": sum(ro.stopped) / len(ro.stopped),
           "value_only": value_only, "seconds": round(time.perf_counter() - t0, 3)}
    return row


# ---------------------------------------------------------------- prompts


def load_prompts(path: Path) -> list[dict]:
    """Prompt rows of a JSONL file (``worldloom.tune.data.read_prompts``: one-line errors for bad rows)."""
    from .data import read_prompts

    return read_prompts(path)


def prompt_rows(path: str, what: str, tokenizer, run_cfg: RunConfig, cfg: TextRLConfig) -> tuple[list[dict], list[list[int]]]:
    """(rows, their prompt ids with the chat template) of a prompts file; every prompt must leave room in the
    context for rl.max_new_tokens."""
    if not path:
        raise ConfigError(f"tune ppo of a text run needs {what}=PROMPTS.jsonl (rows with a prompt; `worldloom data instruct` writes them)")
    if not Path(path).is_file():
        raise ConfigError(f"{what}={path}: no such file")
    rows = load_prompts(Path(path))
    if not rows:
        raise ConfigError(f"{what}={path} holds no prompt rows")
    fmt, context = run_cfg.tune.prompt_format, run_cfg.model.context
    ids = [tokenizer.encode(fmt.format(prompt=row["prompt"])).tolist() for row in rows]
    for i, p in enumerate(ids):
        if len(p) + cfg.max_new_tokens > context:
            raise ConfigError(f"{path}: row {i + 1}'s prompt is {len(p)} tokens; with rl.max_new_tokens={cfg.max_new_tokens} "
                              f"it needs more than the model's context of {context} (shorten it or lower rl.max_new_tokens)")
    return rows, ids


# ---------------------------------------------------------------- the run folder


@dataclass
class Tuner:
    """Everything a text PPO run carries from update to update."""

    run_dir: Path
    cfg: TextRLConfig
    run_cfg: RunConfig
    model: LWM
    reference: Reference
    value_head: ValueHead
    opt: torch.optim.Optimizer
    tokenizer: object
    rows: list[dict]
    prompt_ids: list[list[int]]
    eval_rows: tuple[list[dict], list[list[int]]] | None
    reward: Reward
    gen: torch.Generator
    update: int = 0
    elapsed: float = 0.0


def _optimizer(model, value_head, cfg: TextRLConfig) -> torch.optim.Optimizer:
    trained = [p for p in model.parameters() if p.requires_grad]  # with LoRA: the adapters only
    return torch.optim.AdamW([{"params": trained}, {"params": list(value_head.parameters())}], lr=cfg.lr, weight_decay=0.0)


def _split_reward(overrides: list[str]) -> tuple[str, list[str]]:
    """``reward=SPEC`` out of the overrides (it is no config key)."""
    spec, rest = "", []
    for text in overrides:
        if text.split("=", 1)[0].strip() == "reward":
            spec = text.split("=", 1)[1].strip()
        else:
            rest.append(text)
    return spec, rest


def _data(tokenizer, run_cfg: RunConfig, cfg: TextRLConfig) -> dict:
    """The Tuner's tokenizer, prompt rows and ids, and held-out rows (checked before any work is done)."""
    rows, ids = prompt_rows(run_cfg.data.path, "data.path", tokenizer, run_cfg, cfg)
    ev = prompt_rows(cfg.eval_path, "rl.eval_path", tokenizer, run_cfg, cfg) if cfg.eval_path else None
    return dict(tokenizer=tokenizer, rows=rows, prompt_ids=ids, eval_rows=ev)


def start_text(source: Path, overrides: list[str], reward: Reward | None = None, log=print) -> Tuner:
    """A new PPO run folder from a text run (the source is only read)."""
    from ..recipes import get_recipe
    from .base import prepare_tuned, tuned_config

    source = Path(source)
    spec, rest = _split_reward(overrides)
    rl_dict, rest = parse_rl_overrides(rest, lambda keys: True, "")
    cfg = from_dict(TextRLConfig, rl_dict, prefix="rl.")
    src_cfg = read_run_config(source)
    run_cfg = tuned_config(source, RECIPE, [f"name={src_cfg.name}-ppo", *rest], {"precision": "fp32", "device": "cpu"})
    args = _data(get_recipe(src_cfg.recipe).load(source)[1]["tokenizer"], run_cfg, cfg)  # the source's tokenizer
    reward = reward or make_reward(spec)
    run_dir = run_cfg.run_dir
    if latest_checkpoint(run_dir) is not None or (run_dir / RL_FILE).exists():
        raise ConfigError(f"{run_dir} already holds a run; continue it with `worldloom tune ppo --resume {run_dir}` "
                          "or choose another name=")
    if run_dir.resolve() == source.resolve():
        raise ConfigError("the tuned run needs its own folder; choose another name=")
    save_yaml(to_dict(run_cfg), run_dir / CONFIG)
    args["tokenizer"].save(run_dir / TOKENIZER_DIR)
    save_yaml({"source": str(source), "reward": reward.name, "rl": to_dict(cfg)}, run_dir / RL_FILE)
    torch.manual_seed(cfg.seed)
    model = LWM(run_cfg.model)
    prepare_tuned(model, run_cfg, run_dir)  # the source's weights; with lora.rank: adapters, the rest frozen
    model.eval()
    value_head = ValueHead(run_cfg.model.d_model)
    log(f"tune ppo: {source} -> {run_dir} (reward {reward.name}, {len(args['rows'])} prompts"
        + (f", LoRA rank {run_cfg.lora.rank}" if run_cfg.lora.rank else "") + ")")
    tu = Tuner(run_dir, cfg, run_cfg, model, Reference(model), value_head, _optimizer(model, value_head, cfg),
               reward=reward, gen=torch.Generator().manual_seed(cfg.seed), **args)
    save(tu)  # update 0: a run killed before its first checkpoint resumes from the start
    return tu


def resume_text(run_dir: Path, overrides: list[str], reward: Reward | None = None, log=print) -> Tuner:
    """A text PPO run folder back at its last checkpoint (``rl.*`` overrides, e.g. more updates, apply)."""
    from .base import base_state

    run_dir = Path(run_dir)
    rl_dict, _ = parse_rl_overrides(overrides, lambda keys: False, "rl.<key> (the rest is fixed once a run exists)")
    saved, cfg = read_rl_file(run_dir, TextRLConfig, rl_dict)
    run = load_run(run_dir)
    args = _data(run.tokenizer, run.cfg, cfg)
    reward = reward or make_reward(saved.get("reward", ""))
    value_head = ValueHead(run.cfg.model.d_model)
    value_head.load_state_dict(load_tensors(run.checkpoint / f"{VALUE}.safetensors", "value head"))
    opt = _optimizer(run.model, value_head, cfg)
    resume_optimizer(opt, run.checkpoint, run.state, cfg.lr)
    gen = restore_rng(run.state)
    trim_metrics(run_dir / METRICS, run.state["step"])
    ref = Reference(run.model, None if has_lora(run.model) else base_state(run.cfg, run_dir))
    log(f"tune ppo: resuming {run_dir} at update {run.state['step']}")
    return Tuner(run_dir, cfg, run.cfg, run.model, ref, value_head, opt, reward=reward, gen=gen,
                 update=run.state["step"], elapsed=float(run.state["elapsed"]), **args)


def save(tu: Tuner) -> None:
    state = {"step": tu.update, "elapsed": round(tu.elapsed, 3), "precision": "fp32", **rng_state(tu.gen)}
    save_checkpoint(tu.run_dir, tu.model, tu.opt, state, extra={VALUE: tu.value_head.state_dict()})


# ---------------------------------------------------------------- the loop and the held-out evaluation


def evaluate(tu: Tuner, log=print) -> dict | None:
    """Greedy answers to the rl.eval_path rows, scored by the run's reward -> eval.json."""
    if tu.eval_rows is None:
        return None
    rows, ids = tu.eval_rows
    answers: list[str] = []
    for i in range(0, len(rows), tu.cfg.batch):
        answers += complete(tu.model, tu.tokenizer, ids[i : i + tu.cfg.batch], tu.run_cfg.tune.stop,
                            tu.cfg.max_new_tokens, 0.0, 0)[1]
    scores = tu.reward.score(rows, answers).float()
    result = {"update": tu.update, "eval_path": tu.cfg.eval_path, "rows": len(rows), "reward": float(scores.mean()),
              **({"accuracy": float(scores.mean())} if tu.reward.exact else {})}
    write_json(tu.run_dir / EVAL, result)
    what = f"accuracy {result['accuracy']:.1%}" if tu.reward.exact else f"mean reward {result['reward']:.4f}"
    log(f"held-out ({tu.cfg.eval_path}, {len(rows)} rows, greedy): {what}; wrote {tu.run_dir / EVAL}")
    return result


def _line(tu: Tuner, r: dict) -> str:
    acc = f", accuracy {r['accuracy']:.1%}" if "accuracy" in r else ""
    return f"update {tu.update}: reward {r['reward']:.3f}{acc}, kl {r['kl']:.4f}/token, length {r['length']:.1f}"


def tune_text(run: Path | None, overrides: list[str], resume: Path | None = None, progress: bool = True, log=print,
              reward: Reward | None = None) -> dict:
    """`worldloom tune ppo TEXT_RUN ...`: a new PPO run from ``run``, or ``resume`` one; ``reward`` replaces
    the one the overrides name (tests, callers with their own scorer)."""
    tu = resume_text(resume, overrides, reward, log) if resume is not None else start_text(run, overrides, reward, log)
    set_threads(tu.run_cfg.train.threads)
    postfix = lambda r: {"reward": f"{r['reward']:.3f}", "kl": f"{r['kl']:.3f}"}  # noqa: E731
    row = run_updates(tu, lambda: one_update(tu), lambda: save(tu), postfix, lambda r: _line(tu, r),
                      progress=progress, log=log, max_seconds=tu.cfg.max_minutes * 60)
    ev = evaluate(tu, log)
    log(f"done: {tu.update} updates; run folder {tu.run_dir} (sample it with `worldloom generate {tu.run_dir}`)")
    return {"run_dir": str(tu.run_dir), "updates": tu.update, "reward": row.get("reward"), "eval": ev}
