"""What a completion earns in RLHF (`worldloom tune ppo TEXT_RUN reward=...`).

A ``Reward`` scores a batch: prompt rows (dicts with ``prompt``, usually ``task``) and the
answers the policy wrote (the text before the stop string) -> one float per row.

* ``reward=checker``: the synthetic task's program (``worldloom.tune.tasks.check``) says
  whether the answer is right: 1.0 or 0.0. The mean of these scores is an accuracy.
* ``reward=RUN``: a reward model, a text run with a value head (``model.value_head: true``,
  `worldloom tune reward`): it reads ``prompt_format(prompt) + answer + stop`` with its own
  tokenizer and chat template, and its value at the last token is the reward (the scalar it
  was trained on with Bradley–Terry). A longer text keeps its last ``context`` tokens.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

from ..errors import ConfigError

CHECKER = "checker"


@dataclass
class Reward:
    name: str  # "checker" or the reward run's folder
    score: Callable[[list[dict], list[str]], torch.Tensor]  # (rows, answers) -> (B,) float
    exact: bool = False  # scores are 1 (right) / 0 (wrong): their mean is an accuracy


def make_reward(spec: str) -> Reward:
    """``checker`` or a reward run folder -> its Reward; a one-line ConfigError for anything else."""
    spec = str(spec or "").strip()
    if not spec:
        raise ConfigError("tune ppo of a text run needs a reward: reward=checker (the synthetic tasks' checker) "
                          "or reward=RUN (a reward model from `worldloom tune reward`)")
    if spec == CHECKER:
        return checker_reward()
    if not Path(spec).is_dir():
        raise ConfigError(f"reward={spec} is neither 'checker' nor a run folder (a reward model from `worldloom tune reward`)")
    return model_reward(Path(spec))


def checker_reward() -> Reward:
    from .tasks import check

    def score(rows: list[dict], answers: list[str]) -> torch.Tensor:
        return torch.tensor([1.0 if check(row, ans) else 0.0 for row, ans in zip(rows, answers)])

    return Reward(CHECKER, score, exact=True)


def model_reward(run_dir: Path, batch: int = 16) -> Reward:
    """A reward model's scalar at the last token of prompt + answer + stop."""
    from ..run import load_run

    rm = load_run(run_dir)
    if not rm.cfg.model.value_head or rm.is_world:
        raise ConfigError(f"reward={run_dir} is not a reward model: its model has no value head "
                          "(model.value_head: false); train one with `worldloom tune reward`")
    fmt, stop, context = rm.cfg.tune.prompt_format, rm.cfg.tune.stop, rm.cfg.model.context
    model, tok = rm.model.eval().requires_grad_(False), rm.tokenizer

    @torch.no_grad()
    def score(rows: list[dict], answers: list[str]) -> torch.Tensor:
        seqs = [tok.encode(fmt.format(prompt=row["prompt"]) + ans + stop).tolist()[-context:]
                for row, ans in zip(rows, answers)]
        out = []
        for i in range(0, len(seqs), batch):
            part = seqs[i : i + batch]
            ids = torch.zeros(len(part), max(map(len, part)), dtype=torch.long)  # right-padded: causal, pads come last
            for b, s in enumerate(part):
                ids[b, : len(s)] = torch.tensor(s)
            values = model(ids, head=False).values  # (B, L)
            last = torch.tensor([len(s) - 1 for s in part])
            out.append(values[torch.arange(len(part)), last])
        return torch.cat(out).float()

    return Reward(str(run_dir), score)
