"""Listening and speaking in one stream: audio tokens and mission words in one vocabulary, one model.

The vocabulary (``ListenVocab``): ids [0, K) are the audio tokenizer's codes, then four markers
(``<bos>``, ``<hear>``, ``<say>``, ``<eos>``), then the mission words. Two kinds of row:

    hear:  <bos> a_1 .. a_n <hear> w_1 .. w_m <eos>      transcription: speech, then its text
    say:   <bos> w_1 .. w_m <say> a_1 .. a_n <eos>       speaking: text, then speech

Only what follows the marker is learned (weight 1 from the first answer token to ``<eos>``); the
prompt is given. ``greedy(model, prompts, lo, hi)`` continues prompts greedily with ids restricted
to [lo, hi) or ``<eos>`` (words after ``<hear>``, codes after ``<say>``): the whole sequence each
step, right-padded (a causal model's logits at a row's last real position do not see the pads).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from ..errors import WorldloomError
from .speech import missions

MARKERS = ("<bos>", "<hear>", "<say>", "<eos>")


@dataclass(frozen=True)
class ListenVocab:
    codes: int  # the audio tokenizer's codebook size K
    words: tuple[str, ...]

    @classmethod
    def for_missions(cls, codes: int) -> "ListenVocab":
        return cls(codes, tuple(sorted({w for m in missions() for w in m.split()})))

    @property
    def bos(self) -> int:
        return self.codes

    @property
    def hear(self) -> int:
        return self.codes + 1

    @property
    def say(self) -> int:
        return self.codes + 2

    @property
    def eos(self) -> int:
        return self.codes + 3

    @property
    def first_word(self) -> int:
        return self.codes + len(MARKERS)

    @property
    def size(self) -> int:
        return self.first_word + len(self.words)

    def encode_text(self, text: str) -> list[int]:
        index = {w: i for i, w in enumerate(self.words)}
        unknown = [w for w in text.split() if w not in index]
        if unknown:
            raise WorldloomError(f"{unknown[0]!r} is not a word this run knows (words: {' '.join(self.words)})")
        return [self.first_word + index[w] for w in text.split()]

    def decode_text(self, ids) -> str:
        return " ".join(self.words[i - self.first_word] for i in ids if self.first_word <= i < self.size)

    def hear_row(self, codes, text: str) -> tuple[list[int], int]:
        """The ids of a transcription row and how many of them are the prompt."""
        prompt = [self.bos, *map(int, codes), self.hear]
        return prompt + self.encode_text(text) + [self.eos], len(prompt)

    def say_row(self, codes, text: str) -> tuple[list[int], int]:
        prompt = [self.bos, *self.encode_text(text), self.say]
        return prompt + [*map(int, codes), self.eos], len(prompt)


def pack_rows(rows: list[tuple[list[int], int]], length: int, pad: int) -> dict[str, torch.Tensor]:
    """Rows (ids, prompt length) -> input / target (N, length) and weight (1 on the answer and its <eos>)."""
    n = len(rows)
    ids = torch.full((n, length + 1), pad, dtype=torch.long)
    weight = torch.zeros(n, length)
    for i, (row, prompt) in enumerate(rows):
        ids[i, :len(row)] = torch.tensor(row)
        weight[i, prompt - 1:len(row) - 1] = 1.0  # targets at positions prompt-1 .. len-2 are the answer and <eos>
    return {"input": ids[:, :-1], "target": ids[:, 1:], "weight": weight}


@torch.no_grad()
def greedy(model, prompts: list[list[int]], lo: int, hi: int, eos: int, max_new: int, batch: int = 64) -> list[list[int]]:
    """Each prompt continued greedily by ids in [lo, hi) until ``eos`` (not returned) or ``max_new`` ids."""
    out = []
    for s in range(0, len(prompts), batch):
        out += _greedy_batch(model, prompts[s:s + batch], lo, hi, eos, max_new)
    return out


def _greedy_batch(model, prompts, lo, hi, eos, max_new) -> list[list[int]]:
    device = next(model.parameters()).device
    lengths = torch.tensor([len(p) for p in prompts])
    total = min(int(lengths.max()) + max_new, model.cfg.context)  # never past the model's context
    seq = torch.full((len(prompts), total), eos, dtype=torch.long)
    for i, p in enumerate(prompts):
        seq[i, :len(p)] = torch.tensor(p)
    allowed = torch.full((model.cfg.vocab_size,), float("-inf"))
    allowed[lo:hi] = 0.0
    allowed[eos] = 0.0
    done = torch.zeros(len(prompts), dtype=torch.bool)
    answers: list[list[int]] = [[] for _ in prompts]
    rows = torch.arange(len(prompts))
    for _ in range(max_new):
        width = int(lengths.max())
        if width >= total:  # a row reached the context: every answer ends here
            break
        logits = model(seq[:, :width].to(device)).logits.float().cpu()  # (B, width, V)
        nxt = (logits[rows, lengths - 1] + allowed).argmax(-1)  # (B,)
        for i in (~done).nonzero().flatten().tolist():
            if int(nxt[i]) == eos:
                done[i] = True
            else:
                answers[i].append(int(nxt[i]))
        seq[rows, lengths] = torch.where(done, eos, nxt)
        lengths = lengths + (~done).long()
        if done.all():
            break
    return answers


def exact(said: list[str], truth: list[str]) -> float:
    return float(np.mean([a == b for a, b in zip(said, truth)])) if truth else 0.0
