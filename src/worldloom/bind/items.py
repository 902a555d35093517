"""Binding items: one moment of a MiniGrid/BabyAI level seen three ways.

    view     the 7x7 egocentric symbolic view (``image`` (7, 7, 3), ``direction``), as MiniGrid gives it
    text     a caption written from the true view: "the red ball is two steps ahead and one to the left"
    actions  the shortest action sequence (left / right / forward) that ends facing that object

The target is the object (key, ball or box) the agent can reach first through the cells it sees
(``nearest_target``: breadth-first search over the view, agent at (V//2, V-1) facing up; empty,
floor, goal and open-door cells are passable, unseen ones are not). In a single-object level
(BabyAI-GoToObj) it is the one object in sight. The caption and the path are both functions of
the view; the caption and the path never see each other's program.

Items come from levels by seed: training items from seeds ``data.seed + i``, held-out items from
seeds ``data.seed + 10**6 + i`` (never used in training). From each level a short random walk
(seeded by the level's seed) visits states; up to ``bind.per_level`` distinct states with a
reachable object in sight become items.
"""

from __future__ import annotations

import functools
import io
from collections import deque
from pathlib import Path

import numpy as np

from ..errors import CheckpointError, DataError
from ..io import atomic_write_bytes

VAL_SEEDS = 10**6  # held-out items: seeds data.seed + VAL_SEEDS + i
PAD_ACTION = -1  # actions are stored right-padded with this
TARGETS = ("key", "ball", "box")
PASSABLE = ("empty", "floor", "goal")
NUMBERS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten")
WALK = 24  # random actions tried per level while looking for items
LEFT, RIGHT, FORWARD = 0, 1, 2  # MiniGrid's action ids
_HEADINGS = ((0, -1), (1, 0), (0, 1), (-1, 0))  # view coordinates (x right, y towards the agent): up, right, down, left


OPEN = 0  # MiniGrid's state index of an open door (STATE_TO_IDX["open"])


@functools.cache
def _names() -> tuple[dict[int, str], dict[int, str], int]:
    """MiniGrid's object and colour names by index (through the adapter: nothing else imports minigrid), and OPEN."""
    from ..world.envs import MiniGridAdapter

    return (*MiniGridAdapter.cell_names(), OPEN)


def _passable(cell: np.ndarray) -> bool:
    objects, _, is_open = _names()
    name = objects[int(cell[0])]
    return name in PASSABLE or (name == "door" and int(cell[2]) == is_open)


def nearest_target(image: np.ndarray) -> tuple[tuple[int, int], list[int]] | None:
    """The first object (key, ball, box) the agent can face through seen passable cells, and the
    shortest actions that get it there: ((x, y) in the view, [action ids]); None if none can be reached.
    Breadth-first over (x, y, heading) from the agent's cell, actions tried left, right, forward. A path
    has at least one action: an object the agent already faces is a target only when reached again."""
    objects = _names()[0]
    V = image.shape[0]
    start = (V // 2, V - 1, 0)
    back = {start: None}
    queue = deque([start])
    while queue:
        x, y, h = state = queue.popleft()
        fx, fy = x + _HEADINGS[h][0], y + _HEADINGS[h][1]
        inside = 0 <= fx < V and 0 <= fy < V
        if inside and objects[int(image[fx, fy, 0])] in TARGETS and state != start:
            return (fx, fy), _path(back, state)
        moves = [(LEFT, (x, y, (h - 1) % 4)), (RIGHT, (x, y, (h + 1) % 4))]
        if inside and _passable(image[fx, fy]):
            moves.append((FORWARD, (fx, fy, h)))
        for action, nxt in moves:
            if nxt not in back:
                back[nxt] = (state, action)
                queue.append(nxt)
    return None


def _path(back: dict, state) -> list[int]:
    actions = []
    while back[state] is not None:
        state, action = back[state]
        actions.append(action)
    return actions[::-1]


def caption(image: np.ndarray, target: tuple[int, int]) -> str:
    """'the red ball is two steps ahead and one to the left' for the object at view cell ``target``."""
    objects, colours, _ = _names()
    V = image.shape[0]
    x, y = target
    cell = image[x, y]
    ahead, side = V - 1 - y, x - V // 2
    where = []
    if ahead:
        where.append(f"{NUMBERS[ahead]} step{'s' if ahead > 1 else ''} ahead")
    if side:
        where.append(f"{NUMBERS[abs(side)]} to the {'left' if side < 0 else 'right'}")
    return f"the {colours[int(cell[1])]} {objects[int(cell[0])]} is {' and '.join(where)}"


def level_items(env, adapter, seed: int, per_level: int) -> list[dict]:
    """Up to ``per_level`` items from one level: its first state and the states of a random walk."""
    rng = np.random.default_rng(seed)
    raw, _ = env.reset(seed=int(seed))
    items, seen = [], set()
    for _ in range(WALK + 1):
        fields = adapter.observe(raw)
        found = nearest_target(fields["image"])
        key = fields["image"].tobytes() + bytes([int(fields["direction"])])
        if found is not None and key not in seen:
            seen.add(key)
            items.append({**fields, "text": caption(fields["image"], found[0]), "actions": found[1], "seed": seed})
            if len(items) == per_level:
                break
        raw, _, term, trunc, _ = env.step(int(rng.choice((LEFT, RIGHT, FORWARD, FORWARD))))
        if term or trunc:
            break
    return items


def make_items(env_id: str, n: int, seed: int, per_level: int, action_len: int, progress: bool = False,
               desc: str = "items") -> dict[str, np.ndarray]:
    """``n`` items from levels seed, seed+1, ...: image (n, V, V, 3), direction (n,), text (n,) str,
    actions (n, action_len) int8 right-padded with PAD_ACTION, seed (n,). Paths longer than action_len are skipped."""
    from tqdm import tqdm

    from ..world.envs import make_adapter

    adapter = make_adapter(env_id)
    if adapter.kind != "minigrid":
        raise DataError(f"binding items need a symbolic MiniGrid/BabyAI view; {env_id} is a {adapter.kind} environment")
    env, items, level = adapter.make(), [], seed
    bar = tqdm(total=n, desc=desc, disable=not progress or None)
    try:
        while len(items) < n:
            if level - seed > 50 * n + 1000:
                raise DataError(f"{env_id}: too few levels show a reachable key, ball or box to make {n} items")
            new = [it for it in level_items(env, adapter, level, per_level) if len(it["actions"]) <= action_len]
            taken = new[: n - len(items)]
            items.extend(taken)
            bar.update(len(taken))
            level += 1
    finally:
        env.close()
        bar.close()
    return stack_items(items, action_len)


def stack_items(items: list[dict], action_len: int) -> dict[str, np.ndarray]:
    actions = np.full((len(items), action_len), PAD_ACTION, np.int8)
    for i, it in enumerate(items):
        actions[i, : len(it["actions"])] = it["actions"]
    return {"image": np.stack([it["image"] for it in items]).astype(np.uint8),
            "direction": np.array([it["direction"] for it in items], np.uint8),
            "text": np.array([it["text"] for it in items]), "actions": actions,
            "seed": np.array([it["seed"] for it in items], np.int64)}


FIELDS = ("image", "direction", "text", "actions", "seed")


def save_items(path: Path, items: dict[str, np.ndarray]) -> None:
    buf = io.BytesIO()
    np.savez_compressed(buf, **items)
    atomic_write_bytes(Path(path), buf.getvalue())


def load_items(path: Path) -> dict[str, np.ndarray]:
    try:
        with np.load(Path(path), allow_pickle=False) as z:
            items = {k: z[k] for k in z.files}
    except (OSError, ValueError, EOFError) as e:
        raise CheckpointError(f"{path} is not a readable items file ({e}); delete it to make the items again") from None
    missing = [k for k in FIELDS if k not in items]
    if missing:
        raise CheckpointError(f"{path} lacks the item field {missing[0]!r}; delete it to make the items again")
    return items
