"""Words about a MiniGrid view, written by a program from its true cells, and read back.

The view ``image[i, j]`` (7, 7, 3: object, colour, state) has the agent at (3, 6) looking towards
j = 0 (``tokenize/grid.py``, ``MiniGridAdapter.render``): a cell is ``dx = i - 3`` to the right
and ``ahead = 6 - j`` steps ahead. A *fact* is one visible object (key, ball, box, door, goal,
lava) with its colour and place. Everything here is deterministic, so exact match means something:

* ``caption(facts)``: "a red ball two steps ahead , one to the left ; a blue key one step ahead"
  (nearest rows first, left to right; "nothing" when no object is in view);
* ``parse_caption(text)``: the facts back (None for an item that is not a fact);
* ``questions(image, mission)``: (question, answer) pairs — what is in front, how many keys /
  balls / boxes, where the mission's object is;
* ``norm`` (punctuation as words, the form the stream's word tokenizer reads) and ``tidy`` (the
  form people read: "ahead, one to the left").
"""

from __future__ import annotations

import re
from typing import NamedTuple

import numpy as np

COLOURS = ("red", "green", "blue", "purple", "yellow", "grey")
OBJECTS = ("key", "ball", "box", "door", "goal", "lava")
COUNTED = {"key": "keys", "ball": "balls", "box": "boxes"}  # the objects "how many ...?" asks about
NUMBERS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
CAPTION = "caption:"  # the prompt word of a caption
DRAW = "draw:"  # the first word of a drawing prompt (the stream's prefix)
Q_FRONT = "Q: what is in front of you ? A:"
Q_GOAL = "Q: where is the goal ? A:"
NOT_IN_VIEW = "not in view"
AGENT = (3, 6)  # the agent's own cell in the view


class Fact(NamedTuple):
    obj: str
    colour: str
    dx: int  # cells to the right (negative: left)
    ahead: int  # cells ahead

    @property
    def pair(self) -> str:
        return f"{self.colour} {self.obj}"

    def cell(self, view: int = 7) -> tuple[int, int]:
        """The view cell (i, j) of this place."""
        return view // 2 + self.dx, view - 1 - self.ahead


def norm(text: str) -> str:
    """Punctuation as words of their own, single spaces: the form every text takes in the stream."""
    return " ".join(re.sub(r"\s*([,;?])\s*", r" \1 ", text).split())


def tidy(text: str) -> str:
    """The stream form for people: no space before , ; ?"""
    return re.sub(r" ([,;?])", r"\1", text)


def vocabulary() -> str:
    """Every word the program writes (so a held-out pair's words are in the vocabulary, whatever training saw)."""
    words = [*COLOURS, *OBJECTS, *COUNTED.values(), *NUMBERS, CAPTION, DRAW, Q_FRONT, Q_GOAL, NOT_IN_VIEW,
             "a wall nothing step steps ahead , ; to the left right and how many"]
    return " ".join(words)


def _names():
    from ..world.envs.minigrid import MiniGridAdapter

    return MiniGridAdapter.cell_names()


def facts_of(image) -> list[Fact]:
    """The objects a view shows, nearest rows first, left to right (the agent's own cell left out)."""
    objects, colours = _names()
    image = np.asarray(image)
    V = image.shape[0]
    out = []
    for j in range(V - 1, -1, -1):
        for i in range(V):
            obj, colour = objects.get(int(image[i, j, 0])), colours.get(int(image[i, j, 1]))
            if obj in OBJECTS and colour in COLOURS and (i, j) != (V // 2, V - 1):
                out.append(Fact(obj, colour, i - V // 2, V - 1 - j))
    return out


def place(dx: int, ahead: int) -> str:
    """"two steps ahead , one to the left", "one step ahead", "three to the right"."""
    parts = []
    if ahead:
        parts.append(f"{NUMBERS[ahead]} step{'s' if ahead > 1 else ''} ahead")
    if dx:
        parts.append(f"{NUMBERS[abs(dx)]} to the {'left' if dx < 0 else 'right'}")
    return " , ".join(parts)


def phrase(f: Fact) -> str:
    return f"a {f.colour} {f.obj} {place(f.dx, f.ahead)}"


def caption(facts: list[Fact]) -> str:
    return " ; ".join(phrase(f) for f in facts) or "nothing"


_NUM = "|".join(NUMBERS[1:])
_ITEM = re.compile(rf"a ({'|'.join(COLOURS)}) ({'|'.join(OBJECTS)})"
                   rf"(?: ({_NUM}) steps? ahead)?(?: ,)?(?: ({_NUM}) to the (left|right))?")


def parse_fact(text: str) -> Fact | None:
    m = _ITEM.fullmatch(norm(text))
    if not m or not (m[3] or m[4]):
        return None
    ahead = NUMBERS.index(m[3]) if m[3] else 0
    dx = (NUMBERS.index(m[4]) * (-1 if m[5] == "left" else 1)) if m[4] else 0
    return Fact(m[2], m[1], dx, ahead)


def parse_caption(text: str) -> list[Fact | None]:
    """A caption (or a description to draw) -> its facts in order; an item that is no fact gives None."""
    text = norm(text)
    if text in ("", "nothing"):
        return []
    return [parse_fact(item) for item in text.split(" ; ")]


def mission_target(mission: str) -> tuple[str | None, str] | None:
    """(colour or None, object) a mission names ("go to the red ball", "pick up a key"), or None."""
    m = re.search(rf"\b(?:the|a) (?:({'|'.join(COLOURS)}) )?({'|'.join(OBJECTS)})\b", mission)
    return (m[1], m[2]) if m else None


def _front(image) -> str:
    objects, colours = _names()
    V = image.shape[0]
    obj, colour = objects.get(int(image[V // 2, V - 2, 0])), colours.get(int(image[V // 2, V - 2, 1]))
    if obj in OBJECTS:
        return f"a {colour} {obj}"
    return "a wall" if obj == "wall" else "nothing"


def questions(image, mission: str = "") -> list[tuple[str, str]]:
    """Every (question, answer) about a view, in a fixed order: what is in front, how many keys / balls /
    boxes, and (when the mission names an object) where it is: its places joined by "and", or "not in view"."""
    image = np.asarray(image)
    facts = facts_of(image)
    out = [(Q_FRONT, _front(image))]
    for obj, plural in COUNTED.items():
        out.append((f"Q: how many {plural} ? A:", NUMBERS[min(sum(f.obj == obj for f in facts), 9)]))
    target = mission_target(mission)
    if target is not None:
        where = [place(f.dx, f.ahead) for f in facts if f.obj == target[1] and target[0] in (None, f.colour)]
        out.append((Q_GOAL, " and ".join(where) or NOT_IN_VIEW))
    return out


def mentions(text: str, pairs: tuple[str, ...]) -> bool:
    """Whether a text names one of the colour-object pairs (e.g. "purple key")."""
    return any(re.search(rf"\b{p}\b", text) for p in pairs)


def check_pairs(text: str) -> tuple[str, ...]:
    """``talk.held_out`` ("purple key,yellow box") -> ("purple key", "yellow box"); ValueError naming a bad item."""
    pairs = tuple(" ".join(p.split()) for p in text.split(",") if p.strip())
    for p in pairs:
        words = p.split()
        if len(words) != 2 or words[0] not in COLOURS or words[1] not in OBJECTS:
            raise ValueError(f"talk.held_out item {p!r} is not 'colour object' (colours: {', '.join(COLOURS)}; "
                             f"objects: {', '.join(OBJECTS)})")
    return pairs


def drawn_right(image, facts: list[Fact]) -> list[bool]:
    """For each described fact: does the drawn view hold that object in that colour at that place?"""
    objects, colours = _names()
    image = np.asarray(image)
    V = image.shape[0]
    out = []
    for f in facts:
        i, j = f.cell(V)
        ok = 0 <= i < V and 0 <= j < V and objects.get(int(image[i, j, 0])) == f.obj \
            and colours.get(int(image[i, j, 1])) == f.colour
        out.append(bool(ok))
    return out
