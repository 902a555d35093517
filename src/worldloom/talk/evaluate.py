"""What a talk run says, scored against the program's truth, on views never trained on.

Two sets of views from the held-out (validation) episodes: ``views`` — the first ``talk.eval_views``
views, every t of each episode in turn — and ``held_out_pairs`` — views that show a colour-object
pair of ``talk.held_out`` (never named by any training text). On each:

* ``caption_attr``: facts (object, colour, place) right / max(true facts, said facts), summed over
  views, from the model's caption (after "caption:") parsed back by ``parse_caption`` (an item that is
  no fact counts as said and wrong); ``caption_exact``: captions whose facts are exactly the true ones.
  On ``held_out_pairs`` both count only facts of a held-out pair.
* ``qa``: answers equal to the program's (every question of the view).
  A run with a vision prefix (``talk.view=prefix``) reads each view as its rendered image; the checkers are the same.
* ``draw_attr``: the model draws a view from the true caption (``draw: CAPTION``), and each described
  fact is checked at its place in the drawn cells (``drawn_right``); on ``held_out_pairs`` only the
  held-out facts.
"""

from __future__ import annotations

import numpy as np

from .generate import MAX_ANSWER, TalkModel, batched
from .prefix import view_renderer
from .stream import talk_items
from .text import CAPTION, caption, check_pairs, drawn_right, facts_of, parse_caption

BATCH = 32


def eval_views(episodes: list, n: int, pairs: tuple) -> dict[str, list[tuple]]:
    """(mission, obs ids, image) of the first n views of the episodes, and of the first n showing a held-out pair."""
    plain, held = [], []
    for e in episodes:
        for t in range(e.length):
            view = (e.mission, e.steps[t], e.images[t])
            if len(plain) < n:
                plain.append(view)
            if len(held) < n and any(f.pair in pairs for f in facts_of(e.images[t])):
                held.append(view)
        if len(plain) >= n and len(held) >= n:
            break
    return {"views": plain, "held_out_pairs": held}


def _fact_scores(truth: list, said: list, keep) -> tuple[int, int, bool]:
    """(right, max(true, said), exact) over the facts ``keep`` selects (None items: said, never right)."""
    true = [f for f in truth if keep(f)]
    told = [f for f in said if f is None or keep(f)]
    right = sum(1 for f in set(told) if f is not None and f in true)
    return right, max(len(true), len(told)), set(told) == set(true) and None not in told


def score_views(tm: TalkModel, views: list[tuple], keep=lambda f: True) -> dict:
    """The module's figures on one set of views; ``keep`` picks the facts that count."""
    if not views:
        return {"n_views": 0}
    lay = tm.layout
    obs = np.stack([v[1][: lay.obs_len] for v in views])
    truths = [facts_of(v[2]) for v in views]
    images = np.stack([v[2] for v in views])  # the symbolic views (a vision prefix reads them rendered)
    caps = batched(lambda b: tm.read([views[i][0] for i in b], obs[b], [CAPTION] * len(b), images=images[b]),
                   list(range(len(views))), BATCH)
    cap = [_fact_scores(t, parse_caption(c), keep) for t, c in zip(truths, caps)]
    qa = [(i, q, a) for i, v in enumerate(views) for q, a in talk_items(v[2], v[0])[1:]]
    said = batched(lambda b: tm.read([views[i][0] for i, _, _ in b], obs[[i for i, _, _ in b]], [q for _, q, _ in b],
                                     MAX_ANSWER, images[[i for i, _, _ in b]]), qa, BATCH)
    drawn = batched(lambda b: tm.draw([caption(truths[i]) for i in b]), list(range(len(views))), BATCH)
    drawn_images = lay.decode_obs(np.stack(drawn))["image"]
    draws = [drawn_right(img, [f for f in t if keep(f)]) for img, t in zip(drawn_images, truths)]
    n_draw = sum(len(d) for d in draws)
    return {"n_views": len(views), "caption_attr": sum(c[0] for c in cap) / max(sum(c[1] for c in cap), 1),
            "caption_exact": float(np.mean([c[2] for c in cap])), "n_questions": len(qa),
            "qa": float(np.mean([s == a for s, (_, _, a) in zip(said, qa)])) if qa else None,
            "draw_attr": sum(map(sum, draws)) / n_draw if n_draw else None, "n_draw_facts": n_draw,
            "examples": [{"caption": caps[i], "truth": caption(truths[i])} for i in range(min(3, len(views)))]}


def evaluate_talk(run, episodes: list, precision: str = "fp32") -> dict:
    """Both sets' figures (module doc) for a loaded talk run over its held-out ``TalkEpisode``s."""
    pairs = check_pairs(run.cfg.talk.held_out)
    tm = TalkModel(run.model, run.layout, precision, render=view_renderer(run))
    sets = eval_views(episodes, run.cfg.talk.eval_views, pairs)
    return {"views": score_views(tm, sets["views"]),
            "held_out_pairs": {"pairs": list(pairs), **score_views(tm, sets["held_out_pairs"], lambda f: f.pair in pairs)}}
