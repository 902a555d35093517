"""The model continuing talk prompts, batched: text after a view (captions, answers), or a view after a
description (drawing). Greedy by default; every new token is held to the ids its position may take
(text: the text slice and ``<sep>``; a view's k-th token: the layout's range for that cell). A model with
a vision prefix (``talk.view=prefix``) reads each view as its rendered RGB image (``render``), its
vectors in the prompt where a token view has its ids; they enter on the first call, the cache keeps them.
"""

from __future__ import annotations

import numpy as np
import torch

from ..inference.sampling import sample
from ..runtime import autocast
from ..world.stream import PAD, SEP, StreamLayout
from .stream import draw_prompt, read_prompt, text_allowed, text_of

MAX_TEXT = 120  # most words of one caption (eight objects take about 90)
MAX_ANSWER = 24  # most words of one answer to a question


class TalkModel:
    """A talk run's model and layout, continuing left-padded prompts (ids, slots) over one cache."""

    def __init__(self, model, layout: StreamLayout, precision: str = "fp32", temperature: float = 0.0, seed: int = 0,
                 top_k: int = 0, top_p: float = 1.0, render=None):
        self.model, self.layout, self.precision, self.render = model, layout, precision, render
        self.vectors = model.vision_prefix.vectors if model.vision_prefix is not None else 0
        self.temperature, self.top_k, self.top_p = temperature, top_k, top_p
        self.device = next(model.parameters()).device
        self.gen = torch.Generator().manual_seed(seed)

    def _call(self, ids: np.ndarray, slots: np.ndarray, cache, prefix: dict | None = None) -> torch.Tensor:
        dev = self.device
        skip = torch.zeros(ids.shape, dtype=torch.long, device=dev) if self.model.skip_proj is not None else None
        prefix = {k: torch.from_numpy(v).to(dev) for k, v in (prefix or {}).items()}
        with autocast(self.precision, dev):
            out = self.model(torch.from_numpy(ids).to(dev), cache, torch.from_numpy(slots).to(dev), skip, **prefix)
        return out.logits[:, -1].float()

    @torch.no_grad()
    def _continue(self, prompts: list[tuple[np.ndarray, np.ndarray]], n_new: int, allowed, slot_of, stop: bool,
                  views: np.ndarray | None = None, view_at: list[int] | None = None):
        """Feed left-padded prompts, then n_new tokens each from ``allowed(k)`` with slot ``slot_of(k)``;
        ``stop``: end when every row has emitted <sep>. ``views`` (B, H, W, 3): each row's vision prefix, its
        placeholders from ``view_at[b]`` in the prompt. Returns (B, n) new ids."""
        B, L = len(prompts), max(len(p[0]) for p in prompts)
        if L + n_new > self.model.cfg.context:
            raise ValueError(f"the prompt ({L} tokens) and {n_new} new tokens exceed the model's context ({self.model.cfg.context})")
        ids, slots = np.full((B, L), PAD, np.int64), np.zeros((B, L), np.int64)
        for b, (i, s) in enumerate(prompts):
            ids[b, L - len(i):], slots[b, L - len(i):] = i, s
        pad = torch.tensor([L - len(p[0]) for p in prompts], device=self.device)
        cache = self.model.new_cache(B, self.model.cfg.context, pad)
        prefix = None
        if views is not None:
            at = np.zeros((B, L), bool)
            for b, (i, _) in enumerate(prompts):
                at[b, L - len(i) + view_at[b]: L - len(i) + view_at[b] + self.vectors] = True
            prefix = {"prefix_views": views, "prefix_at": at}
        logits, out = self._call(ids, slots, cache, prefix), []
        done = np.zeros(B, bool)
        for k in range(n_new):
            nxt = sample(logits, self.temperature, top_k=self.top_k, top_p=self.top_p, allowed=allowed(k),
                         generator=self.gen).cpu().numpy()
            out.append(nxt)
            done |= nxt == SEP
            if k == n_new - 1 or stop and done.all():
                break
            logits = self._call(nxt[:, None], np.full((B, 1), slot_of(k)), cache)
        return np.stack(out, axis=1)

    def read(self, missions: list[str], obs_ids: np.ndarray, texts: list[str], max_new: int = MAX_TEXT,
             images: np.ndarray | None = None) -> list[str]:
        """Each view (obs_ids (B, obs_len) stream ids; a vision prefix reads ``images`` (B, V, V, 3), the
        symbolic views, rendered) with its mission in context, then a text; the text's continuation up to
        <sep> (at most ``max_new`` words)."""
        views = view_at = None
        if self.vectors:
            if images is None or self.render is None:
                raise ValueError("this model reads views as a vision prefix: pass images= and give TalkModel render=")
            views, view_at = self.render(images), [len(self.layout.prefix(m)) for m in missions]
        prompts = [read_prompt(self.layout, m, o, t, self.vectors) for m, o, t in zip(missions, obs_ids, texts)]
        mask = text_allowed(self.layout, self.model.cfg.vocab_size).to(self.device)
        new = self._continue(prompts, min(max_new, self.model.cfg.context - max(len(p[0]) for p in prompts)),
                             lambda k: mask, lambda k: 0, stop=True, views=views, view_at=view_at)
        out = []
        for row in new:
            end = np.flatnonzero(row == SEP)
            out.append(text_of(self.layout, row[: end[0]] if len(end) else row))
        return out

    def draw(self, descriptions: list[str]) -> np.ndarray:
        """Each description -> the view the model draws after it: (B, obs_len) stream ids."""
        lay = self.layout
        ranges = torch.as_tensor(lay.step_ranges[: lay.obs_len], device=self.device)
        prompts = [draw_prompt(lay, d) for d in descriptions]
        return self._continue(prompts, lay.obs_len, lambda k: (int(ranges[k, 0]), int(ranges[k, 1])),
                              lambda k: int(lay.step_slots[k]), stop=False)


def batched(fn, items: list, size: int) -> list:
    """fn over items in batches of ``size`` (fn takes and returns lists), results in order."""
    out = []
    for i in range(0, len(items), size):
        out += list(fn(items[i: i + size]))
    return out
