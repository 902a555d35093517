"""A world-model run's report: ``report.md`` with the headline figures and PNG plots next to it.

`write_report(run_dir, result, gif=None)` reads the training log (``metrics.jsonl``) and the
evaluation result (a dict, as the evaluation produces it) and writes, in the run folder:

* ``learning_curves.png`` — training loss per modality and the held-out loss against step;
* ``open_loop.png`` — exact-frame and per-cell accuracy against the imagination horizon, on every
  cell and on the cells seen before (the restated metric), for every stream design measured;
* ``success.png`` — real-environment success of the plain policy and of planning;
* ``rl_success.png`` — success against RL update (BC -> RL), when ``metrics.jsonl`` has RL rows;
* ``report.md`` — a table of the headline figures, the plots, the GIF (if given) and how
  everything was measured.

Every figure is optional: a missing entry of ``result`` prints "—" and a plot without data is
left out, so a partial evaluation still gets a report. All files are written atomically.
"""

from __future__ import annotations

import io
import math
import os
from pathlib import Path

from ...io import atomic_write_bytes, atomic_write_text
from ...train.plots import read_metrics

DASH = "—"
REPORT = "report.md"
PLOTS = {"curves": "learning_curves.png", "open_loop": "open_loop.png", "success": "success.png",
         "rl_success": "rl_success.png"}
RL_UPDATE = ("rl_update", "update")  # the update number of an RL metrics row (the first key present)
LOSS_PARTS = ("loss_obs", "loss_action", "loss_reward", "loss_done", "loss_frame")


# -- reading the result dict (never raises on missing or malformed entries)
def _get(d, *keys):
    for k in keys:
        if isinstance(d, dict) and k in d:
            d = d[k]
        elif isinstance(d, dict) and str(k) in d:
            d = d[str(k)]
        else:
            return None
    return d


def _num(x) -> float | None:
    if isinstance(x, bool) or not isinstance(x, (int, float)):
        return None
    x = float(x)
    return x if math.isfinite(x) else None


def by_action_text(by_action: dict) -> str:
    """teacher_forced_accuracy's by_action -> "left 12.0% (n=40) · right ...": the frames that reveal nothing new
    where the adapter could tell, else all."""
    parts = []
    key = "frame_known" if any("frame_known" in v for v in by_action.values()) else "frame"
    for k, v in sorted(by_action.items(), key=lambda kv: int(kv[0])):
        if v.get(f"{key}_n"):
            parts.append(f"{v.get('name', k)} {pct(v.get(key))} (n={v[f'{key}_n']})")
    return " · ".join(parts) or DASH


def pct(x, *keys) -> str:
    """A fraction as a percentage with one decimal ("41.7%"), or a dash if it is missing; with keys,
    the fraction at ``x[key0][key1]...`` (any missing level gives the dash)."""
    x = _num(_get(x, *keys))
    return DASH if x is None else f"{100 * x:.1f}%"


def _fmt(x, spec: str = ".3f") -> str:
    x = _num(x)
    return DASH if x is None else format(x, spec)


def _int(x) -> str:
    x = _num(x)
    return DASH if x is None else f"{int(x):,}"


def _params(x) -> str:
    x = _num(x)
    if x is None:
        return DASH
    return f"{x / 1e6:.2f}M ({int(x):,})" if x >= 1e5 else f"{int(x):,}"


def _seeds(real) -> str:
    seeds = _get(real, "seeds")
    if isinstance(seeds, (list, tuple)) and len(seeds) == 2 and all(_num(s) is not None for s in seeds):
        return f"{int(seeds[0]):,}–{int(seeds[1]):,}"
    return DASH


def _open_loop(result, k: int):
    """Open-loop accuracy after k steps: from ``horizons`` or else from the curve."""
    h = _get(result, "open_loop", "horizons", str(k))
    if isinstance(h, dict):
        return h
    curve = _get(result, "open_loop", "curve")
    if isinstance(curve, list):
        for row in curve:
            if isinstance(row, dict) and _num(row.get("k")) == k:
                return row
    return None


# -- plots
def _finish_percent(fig, ax, path, xlabel: str, ylabel: str, title: str, legend_size: int) -> bool:
    """Label a plot whose y axis is a percentage (0..100), add grid and legend, save it; True."""
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_ylim(0, 102)
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=legend_size)
    _save(fig, path)
    return True


def _figure(w: float = 7, h: float = 4):
    from matplotlib.backends.backend_agg import FigureCanvasAgg  # headless, no pyplot global state
    from matplotlib.figure import Figure

    fig = Figure(figsize=(w, h), dpi=100)
    FigureCanvasAgg(fig)
    return fig, fig.add_subplot(1, 1, 1)


def _save(fig, path: Path) -> None:
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    atomic_write_bytes(path, buf.getvalue())


def _series(rows: list[dict], key: str) -> tuple[list, list]:
    pts = [(r["step"], r[key]) for r in rows
           if _num(r.get("step")) is not None and _num(r.get(key)) is not None and r[key] > 0]
    return [p[0] for p in pts], [p[1] for p in pts]


def plot_learning_curves(rows: list[dict], path: Path, title: str = "") -> bool:
    lines = [(k, k.removeprefix("loss_") + " (train)", "-") for k in LOSS_PARTS]
    lines.append(("val_loss", "held-out loss", "o-"))
    series = [(label, style, *_series(rows, key)) for key, label, style in lines]
    series = [s for s in series if s[2]]
    if not series:
        return False
    fig, ax = _figure()
    for label, style, x, y in series:
        ax.plot(x, y, style, label=label, lw=1.5 if style != "-" else 1, ms=3, alpha=0.9)
    ax.set_yscale("log")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("cross-entropy (nats/token)")
    ax.set_title(title or "learning curves")
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=8)
    _save(fig, path)
    return True


OPEN_LOOP_LINES = (("frame", "exact frame", "tab:blue", "o"), ("frame_seen", "exact on the cells seen before", "tab:green", "^"),
                   ("frame_shown", "exact on the cells o_0 showed", "tab:olive", "P"),
                   ("frame_known", "exact, episodes that revealed nothing new", "tab:purple", "v"),
                   ("cell", "cells right", "tab:orange", "s"), ("cell_seen", "seen-before cells right", "tab:red", "D"))
DESIGN_STYLES = ("-", "--", ":", "-.")


def open_loop_curves(result) -> dict[str, list]:
    """Every open-loop curve of a result: design label -> rows ({"k", "frame", ...}). ``open_loop`` is
    labelled by its ``label`` or ``mode`` ("tokens"), any other ``open_loop_<name>`` entry (e.g. the frame
    head's ``open_loop_parallel``, another stream design) by its label, mode or name."""
    out = {}
    for key in [k for k in (result if isinstance(result, dict) else {}) if str(k).startswith("open_loop")]:
        curve = _get(result, key, "curve")
        if isinstance(curve, list):
            name = _get(result, key, "label") or (str(key).removeprefix("open_loop_") if key != "open_loop" else None)
            name = str(name or _get(result, key, "mode") or "open loop")
            out[name if name not in out else str(key)] = curve
    return out


def plot_open_loop(curves, path: Path, title: str = "") -> bool:
    """Accuracy of the k-th imagined frame against k: one colour per figure (OPEN_LOOP_LINES), one line
    style per design; ``curves`` is a list of rows (one design) or {design label: rows}."""
    curves = {"": curves} if isinstance(curves, list) else curves if isinstance(curves, dict) else {}
    lines = []
    for d, (design, rows) in enumerate(curves.items()):
        if not isinstance(rows, list):
            continue
        rows = [r for r in rows if isinstance(r, dict) and _num(r.get("k")) is not None]
        for key, label, color, marker in OPEN_LOOP_LINES:
            pts = sorted((_num(r["k"]), 100 * _num(r.get(key))) for r in rows if _num(r.get(key)) is not None)
            if pts:
                name = f"{label} ({design})" if design and len(curves) > 1 else label
                lines.append((pts, name, color, marker + DESIGN_STYLES[d % len(DESIGN_STYLES)]))
    if not lines:
        return False
    fig, ax = _figure()
    for pts, name, color, style in lines:
        ax.plot(*zip(*pts), style, color=color, label=name, ms=3)
    return _finish_percent(fig, ax, path, "imagined steps k (open loop, the real actions fed)",
                           "accuracy of the k-th imagined frame (%)", title or "accuracy against imagination horizon", 7)


def plot_success(result, path: Path, title: str = "") -> bool:
    bars = [(name, _num(_get(result, key, "success"))) for name, key in (("plain policy", "real"), ("planning", "plan"))]
    bars = [(name, 100 * v) for name, v in bars if v is not None]
    if not bars:
        return False
    fig, ax = _figure(4.5, 4)
    names, values = zip(*bars)
    rects = ax.bar(names, values, color=["tab:blue", "tab:orange"][: len(bars)], width=0.6)
    for r, v in zip(rects, values):
        ax.annotate(f"{v:.1f}%", (r.get_x() + r.get_width() / 2, v), ha="center", va="bottom", fontsize=9)
    ax.set_ylim(0, 110)
    ax.set_ylabel("success on held-out seeds (%)")
    ax.set_title(title or "real-environment success")
    ax.grid(alpha=0.3, axis="y")
    _save(fig, path)
    return True


def rl_success_rows(rows: list[dict]) -> list[tuple[float, float]]:
    """(update, success) of the RL stage's metrics rows: those with a numeric ``success`` and an
    update number (``rl_update``, else ``update``), in update order (a resumed run's repeats: the last)."""
    pts = {}
    for r in rows:
        if not isinstance(r, dict) or _num(r.get("success")) is None:
            continue
        update = next((_num(r.get(k)) for k in RL_UPDATE if _num(r.get(k)) is not None), None)
        if update is not None:
            pts[update] = _num(r["success"])
    return sorted(pts.items())


def plot_rl_success(rows: list[dict], path: Path, title: str = "", final=None) -> bool:
    """Success of the episodes each RL update collected against the update (BC -> RL), with the
    final held-out success (``final``, a fraction) as a dashed line; False (nothing drawn) without
    RL rows."""
    pts = rl_success_rows(rows)
    if not pts:
        return False
    fig, ax = _figure()
    x, y = zip(*pts)
    ax.plot(x, [100 * v for v in y], "o-", ms=3, label="RL episodes of each update (sampled policy)")
    if _num(final) is not None:
        ax.axhline(100 * _num(final), color="tab:green", ls="--", label=f"held-out evaluation ({100 * _num(final):.1f}%)")
    return _finish_percent(fig, ax, path, "RL update", "success (%)", title or "success during reinforcement learning", 8)


# -- the report
def _table(result) -> list[str]:
    real, plan, wm = _get(result, "real"), _get(result, "plan"), _get(result, "world_model")
    n_real = _int(_get(real, "episodes"))
    plan_note = []
    if _num(_get(plan, "episodes")) is not None:
        plan_note.append(f"{_int(_get(plan, 'episodes'))} episodes")
    if _num(_get(plan, "horizon")) is not None:
        plan_note.append(f"horizon {_int(_get(plan, 'horizon'))}")

    def groups(what: str, names=("expert", "perturbed", "after_random")) -> str:
        return " / ".join(pct(_get(wm, g, what)) for g in names)

    ol = [_open_loop(result, k) for k in (1, 5, 10)]
    op = _get(result, "onpolicy")
    op_n, op_ok = _num(_get(op, "episodes")), _num(_get(op, "successes"))
    op_success = op_ok / op_n if op_n and op_ok is not None else None
    minutes = _num(_get(result, "minutes"))
    timing = _get(result, "timing")
    replayed = any(_num(_get(wm, g, "novel")) is not None for g in ("expert", "perturbed"))  # the adapter could replay
    has_frame_head = _get(result, "open_loop_parallel") is not None or any(
        _num(_get(wm, g, "frame_parallel")) is not None for g in ("expert", "perturbed"))
    rows = [
        (f"Success, plain policy{' (' + str(_get(real, 'policy')) + ')' if _get(real, 'policy') else ''} "
         f"({n_real} held-out seeds, {_seeds(real)})", pct(_get(real, "success"))),
        ("Success, greedy policy (same seeds)", pct(_get(result, "real_greedy", "success"))),
        *([(f"Success with the mission spoken ({_get(result, 'spoken', 'policy')} policy, same seeds): training voices / "
            f"held-out voices ({_get(result, 'spoken', 'held_out')}) / text mission",
            f"{pct(_get(result, 'spoken', 'training_voices', 'success'))} / "
            f"{pct(_get(result, 'spoken', 'held_out_voices', 'success'))} / {pct(_get(result, 'spoken', 'text'))}")]
          if _get(result, "spoken") is not None else []),
        *([("Success given another level's mission (text, same seeds): what a policy that ignores the mission keeps",
            pct(_get(result, "spoken", "other_mission", "success")))]
          if _get(result, "spoken", "other_mission") is not None else []),
        *([(f"Mission control ({_get(result, 'mission_control', 'policy')} policy, first "
            f"{_get(result, 'mission_control', 'episodes')} seeds): success with its own mission / with another level's",
            f"{pct(_get(result, 'mission_control', 'own'))} / {pct(_get(result, 'mission_control', 'other'))}")]
          if _get(result, "mission_control") is not None else []),
        *([(f"Mission read: the policy's loss on the held-out expert actions (nats), own mission / another episode's, "
            f"at step 0 and over all steps ({_get(result, 'mission_reading', 'episodes')} episodes)",
            f"{_fmt(_get(result, 'mission_reading', 'own', '0', 'nll'), '.3f')} / "
            f"{_fmt(_get(result, 'mission_reading', 'other', '0', 'nll'), '.3f')}; "
            f"{_fmt(_get(result, 'mission_reading', 'own', 'all', 'nll'), '.3f')} / "
            f"{_fmt(_get(result, 'mission_reading', 'other', 'all', 'nll'), '.3f')}")]
          if _get(result, "mission_reading") is not None else []),
        ("Mean return, plain policy", _fmt(_get(real, "mean_return"))),
        ("Mean episode length, plain policy (steps)", _fmt(_get(real, "mean_length"), ".1f")),
        (f"Success, planning in imagination ({', '.join(plan_note) or DASH})", pct(_get(plan, "success"))),
        ("Mean return, planning", _fmt(_get(plan, "mean_return"))),
        *([("Planning: plain policy on the same seeds / share of actions where imagination overrode the policy",
            f"{pct(_get(plan, 'policy_success_same_seeds'))} / {pct(_get(plan, 'overrides'))}")]
          if _num(_get(plan, "overrides")) is not None else []),
        ("Next observation, exact frame: expert / perturbed / after random action", groups("frame")),
        *([("Next observations that reveal a never-seen object (unpredictable): expert / perturbed", groups("novel", ("expert", "perturbed"))),
           ("Next observation, exact frame on the others (a perfect model: 100%): expert / perturbed", groups("frame_known", ("expert", "perturbed")))]
          if replayed else []),
        *([("Next observation, exact frame by the action that led to it" + (" (frames that reveal nothing new)" if replayed else ""),
            by_action_text(_get(wm, "by_action")))]
          if _get(wm, "by_action") else []),
        *([("Next observation, exact frame in one pass (frame head): expert / perturbed", groups("frame_parallel", ("expert", "perturbed")))]
          if has_frame_head else []),
        *([("Next observation decoded and read back as MiniGrid cells (pixel world), exact frame: expert / perturbed",
            groups("frame_cells", ("expert", "perturbed"))),
           ("... share of cells read back right: expert / perturbed", groups("cell_cells", ("expert", "perturbed")))]
          if _num(_get(wm, "expert", "frame_cells")) is not None else []),
        *([("Crafter score (geometric mean of achievement rates, %), plain policy / uniformly random agent, same seeds",
            f'{_fmt(_get(real, "crafter_score"), ".2f")} / {_fmt(_get(result, "random", "crafter_score"), ".2f")}')]
          if _num(_get(real, "crafter_score")) is not None else []),
        ("Next observation, per-token accuracy: expert / perturbed / after random action", groups("token")),
        ("Reward accuracy: expert / perturbed", groups("reward", ("expert", "perturbed"))),
        ("Done accuracy: expert / perturbed", groups("done", ("expert", "perturbed"))),
        ("Expert action accuracy (held-out episodes)", pct(_get(wm, "expert", "action"))),
        ("Open loop, exact frame after 1 / 5 / 10 steps", " / ".join(pct(_get(o, "frame")) for o in ol)),
        *([("Open loop, exact frame after 1 / 5 / 10 steps on episodes that revealed nothing new by then",
            " / ".join(f"{pct(_get(o, 'frame_known'))} (n={_int(_get(o, 'n_known'))})" for o in ol))] if replayed else []),
        ("Open loop, per-cell accuracy after 1 / 5 / 10 steps", " / ".join(pct(_get(o, "cell")) for o in ol)),
        *([("Open loop on the cells seen before (restated): exact frame after 1 / 5 / 10 steps",
            " / ".join(pct(_get(o, "frame_seen")) for o in ol)),
           ("Open loop on the cells seen before (restated): share of those cells right after 1 / 5 / 10 steps",
            " / ".join(pct(_get(o, "cell_seen")) for o in ol))]
          if any(_num(_get(o, "n_seen")) for o in ol) else []),
        *([("Open loop on the cells the model was shown (o_0): exact frame / share of those cells right after 1 / 5 / 10 steps",
            " / ".join(f"{pct(_get(o, 'frame_shown'))} / {pct(_get(o, 'cell_shown'))}" for o in ol))]
          if any(_num(_get(o, "n_shown")) for o in ol) else []),
        *([("Open loop with the frame head (one pass per frame), exact frame after 1 / 5 / 10 steps",
            " / ".join(pct(_get(result, "open_loop_parallel", "horizons", str(k), "frame")) for k in (1, 5, 10)))]
          if has_frame_head else []),
        *([("On-policy episodes (DAgger): played by the model mid-training / its success / bot labels it agreed with",
            f"{_int(_get(op, 'episodes'))} / {pct(op_success)} / {pct(_get(op, 'agreement'))}")] if op is not None else []),
        ("Training steps", _int(_get(result, "step"))),
        ("Training time (minutes)", DASH if minutes is None else f"{minutes:.1f}"),
        ("Parameters", _params(_get(result, "params"))),
        ("Machine", str(_get(result, "machine")) if _get(result, "machine") not in (None, "") else DASH),
    ]
    if isinstance(timing, dict):
        parts = [f"{name} {_fmt(timing.get(key), '.0f')} s" for name, key in
                 (("collect", "collect_s"), ("audio tokenizer stage", "audio_tokenizer_s"), ("tokenizer stage", "tokenizer_s"),
                  ("train", "train_s"), ("on-policy collection", "onpolicy_s"), ("eval", "eval_s"))
                 if _num(timing.get(key)) is not None]
        if parts:
            rows.append(("Wall time", ", ".join(parts)))
    return ["| Figure | Value |", "|---|---|", *(f"| {a} | {b} |" for a, b in rows)]


def _how_measured(result) -> list[str]:
    real, plan, wm = _get(result, "real"), _get(result, "plan"), _get(result, "world_model")
    n = [f"{g.replace('_', ' ')} {_int(_get(wm, g, 'frame_n'))}" for g in ("expert", "perturbed", "after_random")
         if _num(_get(wm, g, "frame_n")) is not None]
    ol_n = _get(_open_loop(result, 1), "n")
    lines = [
        "## How measured",
        "",
        f"- **Success** is the share of real-environment episodes with a positive return, one episode per seed, on "
        f"seeds {_seeds(real)} — never used for training or validation data. The model acts from its own stream "
        "(observation tokens in, an action token out: the likeliest one unless eval.greedy is off) and receives the real rewards, ends and "
        "next observations.",
        f"- **Planning** (worldloom.world.rollout.plan) tries the policy's likeliest first actions (its top 2 and its "
        "own choice) inside the world model, follows the "
        f"model's own policy for the rest of a horizon of {_int(_get(plan, 'horizon'))} imagined steps, and falls "
        "back on the policy: its own action stands unless another of its top actions foresees a confident reward "
        "(one imagined step's expected reward at least the planner's confidence; smaller foreseen rewards count for "
        "nothing) and beats the imagined return of the policy's action by a margin; ties go to the policy. On held-out "
        f"seeds as well ({_int(_get(plan, 'episodes'))} episodes).",
        "- **Next-observation accuracy** is teacher-forced on held-out episodes: given the true history and action, "
        "the likeliest token at each of the next observation's positions is compared with the truth. A frame counts "
        "as exact when all its tokens are right, which is exactly when a greedy token-by-token one-step imagination "
        "reproduces it. *Expert* episodes follow the bot; *perturbed* ones had random actions injected; *after "
        "random action* scores only the transitions right after an injected action (off the expert's path)"
        + (f". Frames scored: {', '.join(n)}." if n else ".")
        + " A next frame that shows an object at a place no earlier observation of the episode showed (found by "
        "replaying the episode in the environment) cannot be predicted exactly by any model; the *unpredictable* row "
        "gives their share and the row after it the exact-frame accuracy on the rest.",
        "- **Frame head** accuracy is the same exact-frame test when the whole next observation is predicted in "
        "one pass from the hidden state after the done token.",
        "- **Reward / done / action accuracy**: the likeliest reward bin, end code and (on expert steps) action, "
        "teacher-forced, against the truth.",
        "- **Open loop**: from the start of a held-out episode the model imagines every observation itself, fed "
        "only the real actions; the k-th imagined frame is compared with the real one (exact frame, and share of "
        "correct cells)" + (f" over {_int(ol_n)} episodes." if _num(ol_n) is not None else "."),
        "- **Open loop on the cells seen before** (the restated target): the k-th imagined frame is scored only on "
        "the cells that show a place of the world an earlier REAL observation of the episode (o_0 .. o_k-1) "
        "showed; the cells a never-seen part of the world would fill are left out (no model can know them). The "
        "views are egocentric, so each view cell is mapped to its place in the world with the agent's position "
        "and direction, found by replaying the episode in the environment (places outside the grid never count). "
        "A frame is *exact* when every such cell (object, color, state) and the agent's direction are right; the "
        "second figure is the share of such cells right over all scored frames.",
        "- **Open loop on the cells the model was shown**: the same, but only the places that o_0 showed count. "
        "Open-loop imagination is given o_0 alone: a place that real o_1 .. o_k-1 first showed was never shown to "
        "the model (it imagined those frames itself), so this is the part of the frame it could know.",
        "- **Losses** are per-modality cross-entropies of the training batches (nats per token); the held-out loss "
        "is the weighted next-token loss on the validation episodes.",
    ]
    if _get(result, "spoken") is not None:
        lines.append("- **Spoken missions**: the same seeds played again with the mission heard instead of read: espeak-ng "
                     "speaks it in a voice drawn from the seed, the run's audio tokenizer turns the speech into audio tokens, "
                     "and they stand where the words stood. *Training voices* are voices of the kind the run trained on "
                     "(other speeds and pitches); *held-out voices* were never heard by the tokenizer nor the model. The "
                     "control gives each seed the mission of another level (as text): a policy that reads its mission "
                     "loses success there; one that ignores it does not, and then the spoken rows say little.")
    return lines


def write_report(run_dir, result: dict, gif: Path | None = None) -> Path:
    """Write ``<run_dir>/report.md`` and its plots (only those with data); returns the report's path."""
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    result = result if isinstance(result, dict) else {}
    run = _get(result, "run") or run_dir.name
    env_id = _get(result, "env_id")
    title = f"{env_id}: {run}" if env_id else str(run)

    rows = [r for r in read_metrics(run_dir / "metrics.jsonl") if isinstance(r, dict)]
    made = {}
    for key, draw in (("curves", lambda p: plot_learning_curves(rows, p, f"{title}: learning curves")),
                      ("open_loop", lambda p: plot_open_loop(open_loop_curves(result), p, f"{title}: open-loop imagination")),
                      ("success", lambda p: plot_success(result, p, f"{title}: success")),
                      ("rl_success", lambda p: plot_rl_success(rows, p, f"{title}: success, BC -> RL",
                                                               _get(result, "real", "success")))):
        path = run_dir / PLOTS[key]
        try:
            made[key] = draw(path)
        except Exception:  # a plot is never worth losing the report over
            made[key] = False
        if not made[key]:
            path.unlink(missing_ok=True)  # no stale plot from an earlier report

    md = [f"# World model report — {env_id or DASH}, run `{run}`", "", *_table(result), ""]
    captions = {"curves": ("Learning curves", "training loss per modality and held-out loss (log scale)"),
                "open_loop": ("Accuracy against imagination horizon", "exact-frame and per-cell accuracy of the k-th imagined frame, on all cells and on the cells seen before"),
                "success": ("Success", "plain policy against planning in imagination, real environment"),
                "rl_success": ("Success during reinforcement learning", "success of each RL update's episodes")}
    if any(made.values()):
        md += ["## Plots", ""]
        for key, ok in made.items():
            if ok:
                head, cap = captions[key]
                md += [f"### {head}", "", f"![{cap}]({PLOTS[key]})", ""]
    if gif is not None:
        gif = Path(gif)
        try:
            rel = Path(os.path.relpath(gif.resolve(), run_dir.resolve())).as_posix()
        except ValueError:  # another drive (Windows)
            rel = gif.as_posix()
        md += ["## An episode", "", f"![an episode: real frames and the model's imagination]({rel})", ""]
    md += [*_how_measured(result), ""]
    path = run_dir / REPORT
    atomic_write_text(path, "\n".join(md))
    return path
