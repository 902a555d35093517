"""Talk segments: views and the program's text about them, in the world stream's one vocabulary.

The talk stream is the world stream (``worldloom.world.stream.StreamLayout``, unchanged) with two
more kinds of segment packed into the same rows as whole episodes:

    read:  <bos> mission <sep> | obs (50) | caption: CAPTION <sep> Q: ... A: ANSWER <sep> ...
    draw:  <bos> draw: DESCRIPTION <sep> | obs (50)

Text lives in the layout's text slice (the ``mission`` word vocabulary, learned from the missions and
every word ``talk.text`` can write), ``<sep>`` ends every caption or answer, text positions have slot
0 (as mission words), observation positions the slots 1..50 of a step, so the model reads a view in
a talk segment exactly as in an episode. What is learned: in a read segment the answers and their
``<sep>`` (the prompts "caption:" / "Q: ... A:" are given), in a draw segment the view. The read
segment's items come in a random order, so any one of them may follow the view directly — the form
`worldloom generate --view` asks in.

``TalkData`` is the world recipe's ``EpisodeData`` whose ``row`` returns, with probability
``talk.fraction``, a talk segment about a random view of the episode instead of the episode; a
training episode (``TalkEpisode.hide``) never yields a text that names a held-out colour-object pair.

With a vision prefix (``talk.view=prefix``, ``worldloom.talk.prefix``) a read segment holds K
placeholders where the view's 50 ids would be (``<bos> mission <sep> | K x <pad> | caption: ...``);
the batch carries the views rendered as RGB (``prefix_views``) and where their vectors go
(``prefix_at``); the model puts the projected vectors there. A prefix cut by the end of a row is left
out (its placeholders stay; nothing after them is in the row). Draw segments and episodes keep token views.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

from ..world.data.packing import EpisodeData
from ..world.stream import BOS, K_MISSION, K_OBS, PAD, SEP, EpisodeTokens, StreamLayout
from .text import CAPTION, DRAW, caption, facts_of, mentions, norm, questions


@dataclass
class TalkEpisode(EpisodeTokens):
    """An episode's tokens plus what its texts are written from."""

    images: np.ndarray = None  # (T, V, V, 3): the views o_0..o_{T-1} (those in the stream)
    mission: str = ""
    hide: tuple = field(default_factory=tuple)  # colour-object pairs its texts must never name


@dataclass
class TalkSegment:
    """A talk segment's per-position slots, kinds and loss weights (its ids are the segment's ``seq``)."""

    slots: np.ndarray
    kinds: np.ndarray
    weight: np.ndarray
    view: np.ndarray | None = None  # (V, V, 3) the view a vision prefix shows at ``view_at`` (prefix runs)
    view_at: int = -1  # where its placeholders start in the segment


def text_ids(layout: StreamLayout, text: str) -> np.ndarray:
    """Text -> stream ids of the text slice (words the vocabulary lacks become its unknown word)."""
    text = norm(text)
    return layout.mission.encode(text).numpy().astype(np.int64) + layout.offset["mission"] if text else np.zeros(0, np.int64)


def text_of(layout: StreamLayout, ids) -> str:
    """Stream ids of the text slice -> text (ids outside it are skipped)."""
    lo = layout.offset["mission"]
    ids = [int(i) - lo for i in ids if lo <= int(i) < lo + layout.size["mission"]]
    return norm(layout.mission.decode(ids)) if ids else ""


def text_allowed(layout: StreamLayout, vocab: int) -> torch.Tensor:
    """(V,) bool: the ids a text position may hold (the text slice and ``<sep>``)."""
    mask = torch.zeros(vocab, dtype=torch.bool)
    lo = layout.offset["mission"]
    mask[lo: lo + layout.size["mission"]] = True
    mask[SEP] = True
    return mask


def read_prompt(layout: StreamLayout, mission: str, obs_ids: np.ndarray, text: str,
                vectors: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """<bos> mission <sep> obs text -> (ids, slots): a view in context, then the start of a text about it.
    ``vectors`` > 0: the view is that many placeholders (slot 0) that a vision prefix fills, not ``obs_ids``."""
    prefix, words = layout.prefix(mission), text_ids(layout, text)
    view = np.full(vectors, PAD, np.int64) if vectors else obs_ids
    view_slots = np.zeros(vectors, np.int64) if vectors else layout.step_slots[: layout.obs_len]
    ids = np.concatenate([prefix, view, words]).astype(np.int64)
    slots = np.concatenate([np.zeros(len(prefix), np.int64), view_slots, np.zeros(len(words), np.int64)])
    return ids, slots


def draw_prompt(layout: StreamLayout, description: str) -> tuple[np.ndarray, np.ndarray]:
    """<bos> draw: description <sep> -> (ids, slots); the view follows."""
    ids = np.concatenate([[BOS], text_ids(layout, f"{DRAW} {description}"), [SEP]]).astype(np.int64)
    return ids, np.zeros(len(ids), np.int64)


def read_segment(layout: StreamLayout, mission: str, obs_ids: np.ndarray, items: list[tuple[str, str]],
                 weight: float, vectors: int = 0) -> tuple[np.ndarray, int, TalkSegment]:
    """A view then (prompt, answer) items, each answer ended by <sep>; the answers weigh ``weight``.
    ``vectors`` > 0: the view is a vision prefix of that many vectors (``read_prompt``)."""
    ids, slots = read_prompt(layout, mission, obs_ids, "", vectors)
    P = len(layout.prefix(mission))
    w = [np.zeros(len(ids), np.float32)]
    parts = [ids]
    for prompt, answer in items:
        q, a = text_ids(layout, prompt), np.concatenate([text_ids(layout, answer), [SEP]])
        parts += [q, a]
        w += [np.zeros(len(q), np.float32), np.full(len(a), weight, np.float32)]
    seq = np.concatenate(parts).astype(np.int64)
    slots = np.concatenate([slots, np.zeros(len(seq) - len(slots), np.int64)])
    kinds = np.where(slots > 0, K_OBS, K_MISSION)
    return seq, P, TalkSegment(slots, kinds, np.concatenate(w))


def draw_segment(layout: StreamLayout, description: str, obs_ids: np.ndarray, weight: float) -> tuple[np.ndarray, int, TalkSegment]:
    """A description then the view it describes, the view weighing ``weight``."""
    ids, slots = draw_prompt(layout, description)
    seq = np.concatenate([ids, obs_ids]).astype(np.int64)
    slots = np.concatenate([slots, layout.step_slots[: layout.obs_len]])
    kinds = np.where(slots > 0, K_OBS, K_MISSION)
    w = np.where(slots > 0, weight, 0.0).astype(np.float32)
    return seq, len(ids), TalkSegment(slots, kinds, w)


def talk_items(image, mission: str) -> list[tuple[str, str]]:
    """Every (prompt, answer) a read segment holds about a view: the caption, then the questions."""
    return [(CAPTION, caption(facts_of(image))), *questions(image, mission)]


class TalkData(EpisodeData):
    """Episodes and talk segments packed together (module doc). ``tc`` is the run's ``talk`` config;
    ``vectors`` > 0 (and ``render``: symbolic views -> RGB) for read segments that show a vision prefix."""

    def __init__(self, layout: StreamLayout, train: list[TalkEpisode], val: list[TalkEpisode], cfg, tc,
                 step_skip: bool = False, vectors: int = 0, render=None):
        super().__init__(layout, train, val, cfg, frame_head=False, step_skip=step_skip)
        self.tc, self.vectors, self.render = tc, vectors, render

    def row(self, ep, context: int, start: int | None = None, gen: torch.Generator | None = None):
        if start is None and isinstance(ep, TalkEpisode) and ep.length and float(torch.rand(1, generator=gen)) < self.tc.fraction:
            seg = self.talk_segment(ep, gen)
            if seg is not None and len(seg[0]) <= context + 1:
                return seg
        return super().row(ep, context, start, gen)

    def talk_segment(self, ep: TalkEpisode, gen: torch.Generator | None):
        """A read or draw segment about a random view of ``ep``; None when its text would name a hidden pair."""
        t = int(torch.randint(ep.length, (1,), generator=gen))
        obs_ids, image = ep.steps[t, : self.layout.obs_len], ep.images[t]
        if float(torch.rand(1, generator=gen)) < self.tc.draw:
            text = caption(facts_of(image))
            return None if mentions(text, ep.hide) else draw_segment(self.layout, text, obs_ids, self.tc.weight_draw)
        items = [it for it in talk_items(image, ep.mission) if not mentions(f"{it[0]} {it[1]}", ep.hide)]
        order = torch.randperm(len(items), generator=gen).tolist()
        seq, P, seg = read_segment(self.layout, ep.mission, obs_ids, [items[k] for k in order], self.tc.weight_text,
                                   self.vectors)
        if self.vectors:
            seg.view, seg.view_at = image, P
        return seq, P, seg

    def segment(self, seq: np.ndarray, P: int, policy, skip: np.ndarray | None = None):
        if not isinstance(policy, TalkSegment):
            return super().segment(seq, P, policy, skip)
        kinds = policy.kinds.copy()
        kinds[0] = 0  # <bos> is never a target
        return seq, policy.slots, kinds, policy.weight, np.zeros(len(seq), np.int64), seq.copy()

    def collate(self, rows, length: int | None = None) -> dict:
        """The episode batch plus ``part_text`` (text targets that count: logged as loss_text)."""
        batch = super().collate(rows, length)
        lo, n = self.layout.offset["mission"], self.layout.size["mission"]
        tgt = batch["target"]
        batch["part_text"] = (((tgt >= lo) & (tgt < lo + n)) | (tgt == SEP)) & (batch["weight"] > 0)
        if self.vectors:
            batch.update(self.prefix_inputs(rows, batch["input"].shape, length))
        return batch

    def prefix_inputs(self, rows, shape: tuple[int, int], length: int | None) -> dict:
        """``prefix_views`` (N, H, W, 3) uint8 and ``prefix_at`` (B, T) bool for the read segments whose
        placeholders all lie in the (cut) input row, in row order."""
        K = self.vectors
        at = np.zeros(shape, bool)
        views = []
        for b, segments in enumerate(rows):
            total = sum(len(seg[0]) for seg in segments)
            n = (min(total, length) if length is not None else total) - 1  # input positions of this row
            off = 0
            for seq, _, policy in segments:
                if isinstance(policy, TalkSegment) and policy.view is not None and off + policy.view_at + K <= n:
                    at[b, off + policy.view_at: off + policy.view_at + K] = True
                    views.append(policy.view)
                off += len(seq)
        return {"prefix_views": torch.from_numpy(self.render(np.asarray(views, np.uint8).reshape(-1, *self.view_shape))),
                "prefix_at": torch.from_numpy(at)}

    @property
    def view_shape(self) -> tuple[int, ...]:
        return tuple(self.splits["train"][0].images.shape[1:])
