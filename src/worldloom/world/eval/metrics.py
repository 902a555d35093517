"""World-model accuracy on held-out episodes, teacher-forced (one forward pass per batch).

For every held-out transition (o_t, a_t) -> (r_t, d_t, o_{t+1}) the model's likeliest token at
each position — restricted to the ids that position may hold — is compared with the truth,
given the true history. Because a greedy token-by-token decode of o_{t+1} only ever sees
correct tokens while it stays correct, "all 50 teacher-forced argmaxes right" is exactly
"the greedily imagined next frame is exactly right": the exact-frame accuracy reported
here is the one-step accuracy of greedy imagination.

Reported separately for expert episodes, perturbed episodes, and the transitions right after
an injected random action (the hardest: off the expert's path). Where the environment adapter
can tell (``novel``), frames are also scored apart by whether they reveal an object that no
earlier observation of the episode showed: such a frame cannot be predicted exactly by any
model, so ``frame_known`` (exact frames among the others) is the accuracy a perfect world model
would bring to 100%, and ``novel`` the share of transitions that reveal something new. The policy's accuracy on
held-out expert actions and, with a frame head, the parallel (one-pass) frame accuracy are
reported too.
"""

from __future__ import annotations

import numpy as np
import torch

from ...modality import step_positions
from ...model import model_inputs
from ...runtime import autocast
from ..data.packing import EpisodeData
from ..stream import K_ACTION, K_DONE, K_OBS, K_REWARD, SEP, EpisodeTokens, StreamLayout


def _target_ranges(layout: StreamLayout, inp: np.ndarray, slots: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """[lo, hi) of the ids allowed at each target position, from the (structural) slots of the inputs."""
    tslot = np.where(slots == layout.step_len, 1, slots + 1)
    tslot = np.where(slots == 0, np.where(inp == SEP, 1, 0), tslot)  # inside the prefix: not a step position
    rng = np.concatenate([[[0, layout.vocab_size]], layout.step_ranges])  # slot 0: anything
    return rng[tslot, 0], rng[tslot, 1]


class _Tally:
    def __init__(self):
        self.n = {}
        self.k = {}

    def add(self, name: str, correct: np.ndarray):
        correct = np.asarray(correct, bool).reshape(-1)
        self.n[name] = self.n.get(name, 0) + correct.size
        self.k[name] = self.k.get(name, 0) + int(correct.sum())

    def result(self) -> dict:
        return {name: {"accuracy": self.k[name] / self.n[name] if self.n[name] else None, "n": self.n[name]} for name in self.n}


@torch.no_grad()
def teacher_forced_accuracy(model, layout: StreamLayout, episodes: list[EpisodeTokens], perturbed: list[bool],
                            after_random: list[np.ndarray], context: int, batch_size: int = 16, precision: str = "fp32",
                            novel: list[np.ndarray | None] | None = None, read_cells=None,
                            views: list[np.ndarray] | None = None, action_steps: dict | None = None) -> dict:
    """Accuracy of next-observation frames and tokens, rewards, ends and expert actions.

    ``perturbed[i]`` marks episode i as perturbed; ``after_random[i]`` (T,) marks the steps whose
    action was injected at random; ``novel[i]`` (T,) (optional, None for an episode the adapter
    cannot tell) counts the never-seen objects that o_{t+1} reveals. Only each episode's first
    window (context) is scored.

    A pixel world with its symbolic views stored (``views[i]`` (T+1, V, V, 3), and ``read_cells`` from
    frames to views, as ``open_loop_accuracy`` takes it) also gets ``frame_cells``: the predicted next
    frame's codes decoded to pixels and read back as cells, exact on every cell of the real view (the
    symbolic world model's ``frame``, measured through the image tokenizer), and ``cell_cells``.

    ``by_action`` holds the next frames (expert and perturbed together) by the action that led to them (keys
    "0", "1", ...: ``frame`` and, with ``novel``, ``frame_known``): a world model that cannot yet carry what it saw
    through a turn scores well after "forward" and badly after "left" and "right".

    ``action_steps``, a dict, is filled with ``mission_reading``'s rows for these episodes behind their own
    missions ({step: [(nll, right), ...]}), from the same forward passes, so that it need not run them again.
    """
    model.eval()
    data = EpisodeData(layout, episodes, episodes, _weights_all(), frame_head=model.frame is not None,
                       step_skip=model.skip_proj is not None, step_cost=step_positions(layout.step_len, model.cfg.obs_len, model.cfg.obs_vectors))
    tally = _Tally()
    predicted = []  # (group, predicted frame ids, real view) of pixel worlds read back as cells
    L, S = layout.obs_len, layout.step_len
    i0 = 0
    for batch in data.windows("val", context, batch_size):
        B = batch["input"].shape[0]
        with autocast(precision, torch.device("cpu")):
            out = model(**model_inputs(batch))
            logits = out.logits.float()
        if action_steps is not None:
            _add_action_rows(action_steps, logits, batch, layout)
        inp, slots, tgt = batch["input"].numpy(), batch["slots"].numpy(), batch["target"].numpy()
        lo, hi = _target_ranges(layout, inp, slots)
        ids = torch.arange(logits.shape[-1])
        allowed = (ids >= torch.from_numpy(lo)[..., None]) & (ids < torch.from_numpy(hi)[..., None])
        pred = logits.masked_fill(~allowed, float("-inf")).argmax(-1).numpy()
        right = pred == tgt
        if model.frame is not None:
            fl = out.frame_logits
        for b in range(B):
            e = i0 + b
            ep = episodes[e]
            P = len(ep.prefix)
            m = min(ep.length, (context + 1 - P) // data.step_cost)  # steps in this window
            group = "perturbed" if perturbed[e] else "expert"
            for t in range(m):
                base = P + t * S - 1  # input index whose target is the first token of o_t
                if t > 0:  # o_t for t >= 1 is a transition's outcome (o_0 is given at reset)
                    frame = right[b, base : base + L]
                    tally.add(f"{group}/frame", frame.all())
                    if read_cells is not None:
                        predicted.append((group, pred[b, base : base + L], views[e][t]))
                    tally.add(f"{group}/token", frame)
                    moved = f"action{int(ep.steps[t - 1, L]) - layout.offset['action']}"  # the action that led to o_t
                    tally.add(f"{moved}/frame", frame.all())
                    if novel is not None and novel[e] is not None:
                        new = bool(novel[e][t - 1] > 0)
                        tally.add(f"{group}/novel", new)
                        if not new:
                            tally.add(f"{group}/frame_known", frame.all())
                            tally.add(f"{moved}/frame_known", frame.all())
                    if group == "perturbed" and after_random[e][t - 1]:
                        tally.add("after_random/frame", frame.all())
                        tally.add("after_random/token", frame)
                a, r, d = base + L, base + L + 1, base + L + 2
                if ep.policy[t] >= 0:  # the step has an expert label
                    tally.add(f"{group}/action", right[b, a])
                tally.add(f"{group}/reward", right[b, r])
                tally.add(f"{group}/done", right[b, d])
        if model.frame is not None and fl is not None:  # parallel frames, in the order collate listed them
            fi = batch["frame_index"].numpy()
            frame_ok = (layout.mask_frame(fl).argmax(-1) == batch["frame_target"]).numpy()
            for k, flat in enumerate(fi):
                b = flat // inp.shape[1]
                tally.add(f"{'perturbed' if perturbed[i0 + b] else 'expert'}/frame_parallel", frame_ok[k].all())
        i0 += B
    _add_cells_read_back(tally, layout, predicted, read_cells)
    res = tally.result()
    out = {}
    for key, v in res.items():
        group, what = key.split("/")
        if group.startswith("action"):  # by the action that led to the frame: out["by_action"]["0"], ...
            into = out.setdefault("by_action", {}).setdefault(group[len("action"):], {})
        else:
            into = out.setdefault(group, {})
        into[what] = v["accuracy"]
        into[f"{what}_n"] = v["n"]
    return out


MISSION_SHIFT = 7  # mission_reading's other mission: that of the episode this many places on
MISSION_STEPS = 4  # steps reported one by one; the later ones together


def mission_reading(model, layout: StreamLayout, episodes: list, context: int, batch_size: int = 16,
                    precision: str = "fp32", own: dict | None = None) -> dict | None:
    """How much the policy reads its mission: its loss (nats) and argmax accuracy on the expert's action at every
    step of ``episodes`` (Episode objects; each one's first window), behind each episode's own mission (``own``)
    and behind the mission of the episode ``MISSION_SHIFT`` places on (``other``), by step of the episode
    ("0".."3", "4+") and over ``all``. A policy that reads its mission loses more behind the wrong one, above all
    before its path shows the target. None when the episodes share one mission (nothing to swap). ``own``: the
    own-mission rows already collected by ``teacher_forced_accuracy(action_steps=...)`` over the same episodes."""
    import dataclasses

    missions = [e.mission for e in episodes]
    if len(set(missions)) < 2:
        return None
    model.eval()
    cost = step_positions(layout.step_len, model.cfg.obs_len, model.cfg.obs_vectors)
    other = rotated_missions(missions)
    out = {"episodes": len(episodes), "same_mission": sum(a == b for a, b in zip(missions, other)), "own": {}, "other": {}}
    for name, ms in (("own", missions), ("other", other)):
        if name == "own" and own:
            out[name] = by_step(own)
            continue
        eps = [layout.episode(dataclasses.replace(e, mission=m)) for e, m in zip(episodes, ms)]
        data = EpisodeData(layout, eps[:1], eps, _weights_all(), step_skip=model.skip_proj is not None, step_cost=cost)
        by: dict[int, list] = {}
        for batch in data.windows("val", context, batch_size):  # each episode's first window: action j is step j
            with torch.no_grad(), autocast(precision, torch.device("cpu")):
                logits = model(**model_inputs(batch)).logits
            _add_action_rows(by, logits.float(), batch, layout)
        out[name] = by_step(by)
    return out


def _add_action_rows(by: dict, logits: torch.Tensor, batch: dict, layout: StreamLayout) -> None:
    """Append (nll, right) of every weighted expert action in a batch of first windows to by[step] (steps past
    MISSION_STEPS together): mission_reading's rows."""
    lo, hi = layout.offset["action"], layout.offset["action"] + layout.n_actions
    logp = torch.log_softmax(logits[..., lo:hi].float(), -1)
    tgt = batch["target"]
    is_act = (tgt >= lo) & (tgt < hi) & (batch["weight"] > 0)
    for b in range(tgt.shape[0]):
        pos = torch.nonzero(is_act[b]).flatten()
        t = tgt[b, pos] - lo
        lp = logp[b, pos]
        nll = (-lp.gather(1, t.unsqueeze(1)).squeeze(1)).tolist()
        ok = (lp.argmax(-1) == t).tolist()
        for j in range(len(pos)):
            by.setdefault(min(j, MISSION_STEPS), []).append((nll[j], ok[j]))


def rotated_missions(missions: list[str]) -> list[str]:
    """mission_reading's other missions: each episode gets that of the episode MISSION_SHIFT places on."""
    return [missions[(i + MISSION_SHIFT) % len(missions)] for i in range(len(missions))]


def by_step(by: dict[int, list[tuple[float, int]]]) -> dict:
    """{step: [(nll, right), ...]} -> mission_reading's rows: steps "0".."3", "4+" and "all", each
    {"nll", "accuracy", "n"}."""
    rows = {(str(k) if k < MISSION_STEPS else f"{MISSION_STEPS}+"): v for k, v in sorted(by.items())}
    rows["all"] = [x for v in by.values() for x in v]
    return {k: {"nll": float(np.mean([x[0] for x in v])), "accuracy": float(np.mean([x[1] for x in v])), "n": len(v)}
            for k, v in rows.items()}


def _add_cells_read_back(tally, layout: StreamLayout, predicted: list, read_cells, chunk: int = 512) -> None:
    """Predicted frames (ids) decoded by the image tokenizer, read back as cells, against the real views."""
    for i in range(0, len(predicted), chunk):
        part = predicted[i : i + chunk]
        got = read_cells(layout.decode_obs(np.stack([p[1] for p in part]))["pixels"])  # (n, V, V, 3)
        ok = (got == np.stack([p[2] for p in part])).all(-1).reshape(len(part), -1)  # (n, cells)
        for (group, _, _), row in zip(part, ok):
            tally.add(f"{group}/frame_cells", row.all())
            tally.add(f"{group}/cell_cells", row)


def _weights_all():
    from ...config import StreamConfig

    return StreamConfig()


def seen_cell_accuracy(pred_image: np.ndarray, real_image: np.ndarray, pred_dir: np.ndarray, real_dir: np.ndarray,
                       seen: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Imagined frames scored on the cells seen before (the restated open-loop metric).

    pred_image, real_image (N, V, V, C); pred_dir, real_dir (N,); seen (N, V, V) bool: the view
    cells whose place in the world an earlier REAL observation of the episode showed (an env
    adapter's ``seen_cells``; the egocentric views are mapped into the world by the agent's
    position and direction, so a cell counts wherever in the view it now lies). A cell is right
    when every channel (object, color, state) equals the truth. Returns, per frame:
    ``exact`` (N,) bool — every seen cell right and the direction right (the direction follows
    from the actions alone, so it is always predictable); ``right`` (N,) and ``counted`` (N,)
    — how many seen cells are right, out of how many. Cells never seen before (a part of the
    world this episode had not shown) are not scored: no model could know them.
    """
    N = len(real_image)
    ok = (np.asarray(pred_image) == np.asarray(real_image)).all(-1).reshape(N, -1)  # (N, V*V)
    seen = np.asarray(seen, bool).reshape(N, -1)  # (N, V*V)
    dirs = np.asarray(pred_dir).astype(np.int64) == np.asarray(real_dir).astype(np.int64)
    exact = (ok | ~seen).all(1) & dirs
    return exact, (ok & seen).sum(1), seen.sum(1)


def episode_flags(episodes) -> tuple[list[bool], list[np.ndarray]]:
    """(perturbed flag, after-random-action mask) of each Episode."""
    return [bool(e.perturbed) for e in episodes], [np.asarray(e.random_action, bool) for e in episodes]
