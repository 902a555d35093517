"""`worldloom generate TALK_RUN --view seed=N "Q: ... A:"` and `--draw "DESCRIPTION" --out view.png`."""

from __future__ import annotations

import io
import re
from pathlib import Path

import numpy as np

from ..errors import WorldloomError
from .text import CAPTION, DRAW, caption, facts_of, norm, tidy


def is_talk_layout(layout) -> bool:
    """Whether a world run's text vocabulary holds the talk words (a run of the talk recipe)."""
    vocab = layout.mission.tok.get_vocab()
    return CAPTION in vocab and DRAW in vocab


def unknown_words(layout, text: str) -> list[str]:
    vocab = layout.mission.tok.get_vocab()
    return [w for w in norm(text).split() if w not in vocab]


def view_seed(spec: str) -> int:
    m = re.fullmatch(r"seed=(\d{1,10})", spec.strip())
    if not m:
        raise WorldloomError(f"--view takes seed=N (the first view of that level), got {spec!r}")
    return int(m[1])


def first_view(env_id: str, seed: int) -> tuple[dict, str]:
    """The observation fields (batched, N=1) and mission of a level's first observation."""
    from ..world.envs import make_adapter

    adapter = make_adapter(env_id)
    env = adapter.make()
    try:
        obs, _ = env.reset(seed=seed)
    finally:
        env.close()
    return {k: v[None] for k, v in adapter.observe(obs).items()}, adapter.mission(obs)


def generate(args) -> int:
    """The talk forms of `worldloom generate` (module doc); one-line errors for anything else."""
    from ..run import load_run
    from ..runtime import set_threads
    from .generate import TalkModel
    from .prefix import view_renderer

    if args.view and args.draw:
        raise WorldloomError("--view (text about a view) and --draw (a view from text) are two directions; choose one")
    if args.draw is not None and args.prompt:
        raise WorldloomError(f"--draw takes the description itself (--draw \"a red ball two steps ahead\"); drop {args.prompt!r}")
    text = args.draw if args.draw is not None else args.prompt
    if not text or not text.strip():
        raise WorldloomError("--draw needs a description" if args.draw is not None else
                             f"--view needs a text to continue, e.g. \"{tidy(CAPTION)}\" or \"Q: what is in front of you? A:\"")
    seed = view_seed(args.view) if args.view else None
    set_threads(0)
    run = load_run(Path(args.run))
    if not run.is_world or not is_talk_layout(run.layout):
        raise WorldloomError(f"--view/--draw need a talk run (`worldloom train babyai-talk`); {args.run} is a "
                             f"{run.cfg.recipe} run")
    unknown = unknown_words(run.layout, text)
    if unknown:
        raise WorldloomError(f"words the run never learned: {', '.join(sorted(set(unknown)))} (docs/talk.md lists the talk's words)")
    tm = TalkModel(run.model, run.layout, args.precision, args.temperature, args.seed or 0, args.top_k, args.top_p,
                   render=view_renderer(run))
    try:
        if seed is not None:
            fields, mission = first_view(run.cfg.env.id, seed)
            answer = tm.read([mission], run.layout.encode_obs(fields), [text], images=fields["image"])[0]
            print(tidy(f"{norm(text)} {answer}"))
            return 0
        drawn = run.layout.decode_obs(tm.draw([text]))
    except ValueError as e:  # a prompt over the context, or a sampling setting the sampler refuses
        raise WorldloomError(f"cannot generate: {str(e).splitlines()[0]}") from None
    write_png(run.cfg.env.id, {k: v[0] for k, v in drawn.items()}, Path(args.out))
    print(f"drew: {tidy(caption(facts_of(drawn['image'][0])))}\nwrote {args.out}")
    return 0


def write_png(env_id: str, fields: dict, out: Path) -> None:
    """A view drawn by the environment adapter's renderer, written atomically as PNG."""
    from PIL import Image

    from ..io import atomic_write_bytes
    from ..world.envs import make_adapter

    rgb = np.asarray(make_adapter(env_id).render(fields), np.uint8)
    buf = io.BytesIO()
    Image.fromarray(rgb).save(buf, format="PNG")
    out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(out, buf.getvalue())
