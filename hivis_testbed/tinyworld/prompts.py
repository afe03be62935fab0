"""Questions about a scene, their reference answers, and a parser that grades descriptions.

Prompt kinds (a training mix draws from all of them):
- ``describe``: a long, templated description, objects in reading order (row-major, the
  order of the image tokens), position first: "In the center, there is a large red circle."
- ``count``, ``background``: global facts.
- ``colour`` (of a shape that is unique in the scene), ``where`` (of a unique colour+shape),
  ``cell`` ("What is in the top left?"), ``yesno`` ("Is there a red circle?").
"""

from __future__ import annotations

import dataclasses
import re

import numpy as np

from .scenes import CELLS, COLOURS, SHAPES, Scene

NUMBERS = ("zero", "one", "two", "three", "four", "five")
DESCRIBE = "Describe the image in detail."
KINDS = ("describe", "count", "background", "colour", "where", "cell", "yesno")


@dataclasses.dataclass(frozen=True)
class QA:
    kind: str
    question: str
    answer: str


def describe(scene: Scene) -> str:
    n = len(scene.objects)
    head = (f"There is one shape on a {scene.background} background." if n == 1 else
            f"There are {NUMBERS[n]} shapes on a {scene.background} background.")
    body = [f"In the {CELLS[o.cell]}, there is a {o.size} {o.colour} {o.shape}." for o in scene.objects]
    return " ".join([head, *body])


def ask(scene: Scene, kind: str, rng: np.random.Generator) -> QA:
    """A question of `kind` about `scene` with its reference answer.

    Kinds that need a unique object fall back to ``count`` when the scene has none.
    """
    objs = scene.objects
    if kind == "describe":
        return QA(kind, DESCRIBE, describe(scene))
    if kind == "background":
        return QA(kind, "What colour is the background?", f"The background is {scene.background}.")
    if kind == "colour":
        unique = [o for o in objs if sum(p.shape == o.shape for p in objs) == 1]
        if unique:
            o = unique[rng.integers(len(unique))]
            return QA(kind, f"What colour is the {o.shape}?", f"The {o.shape} is {o.colour}.")
    if kind == "where":
        unique = [o for o in objs if sum((p.shape, p.colour) == (o.shape, o.colour) for p in objs) == 1]
        if unique:
            o = unique[rng.integers(len(unique))]
            return QA(kind, f"Where is the {o.colour} {o.shape}?",
                      f"The {o.colour} {o.shape} is in the {CELLS[o.cell]}.")
    if kind == "cell":
        c = int(rng.integers(9))
        o = scene.at(c)
        ans = (f"There is a {o.size} {o.colour} {o.shape} in the {CELLS[c]}." if o else
               f"There is nothing in the {CELLS[c]}.")
        return QA(kind, f"What is in the {CELLS[c]}?", ans)
    if kind == "yesno":
        present = {(o.colour, o.shape) for o in objs}
        if rng.random() < 0.5:
            colour, shape = sorted(present)[rng.integers(len(present))]
        else:
            colour, shape = list(COLOURS)[rng.integers(len(COLOURS))], SHAPES[rng.integers(len(SHAPES))]
        yes = (colour, shape) in present
        return QA(kind, f"Is there a {colour} {shape}?",
                  f"Yes, there is a {colour} {shape}." if yes else f"No, there is no {colour} {shape}.")
    n = len(objs)
    return QA("count", "How many shapes are there?",
              "There is one shape." if n == 1 else f"There are {NUMBERS[n]} shapes.")


_HEAD = re.compile(r"There (?:is|are) (\w+) shapes? on a (\w+) background\.")
_OBJ = re.compile(r"In the ([a-z ]+?), there is a (\w+) (\w+) (\w+)\.")


@dataclasses.dataclass
class Parsed:
    count: str | None
    background: str | None
    objects: list[tuple[str, str, str, str]]  # (cell, size, colour, shape) in the order written


def parse_description(text: str) -> Parsed:
    head = _HEAD.search(text)
    return Parsed(
        count=head.group(1) if head else None,
        background=head.group(2) if head else None,
        objects=[m.groups() for m in _OBJ.finditer(text)],
    )


ATTRIBUTES = ("count", "background", "position", "size", "colour", "shape")


def grade_description(scene: Scene, text: str) -> dict[str, list[bool]]:
    """Per-attribute correctness of a generated description.

    Objects are compared by index (k-th described vs k-th true, both in reading order);
    a missing described object counts as wrong on every object attribute.
    """
    p = parse_description(text)
    out: dict[str, list[bool]] = {a: [] for a in ATTRIBUTES}
    out["count"].append(p.count == NUMBERS[len(scene.objects)])
    out["background"].append(p.background == scene.background)
    for k, o in enumerate(scene.objects):
        d = p.objects[k] if k < len(p.objects) else (None, None, None, None)
        out["position"].append(d[0] == CELLS[o.cell])
        out["size"].append(d[1] == o.size)
        out["colour"].append(d[2] == o.colour)
        out["shape"].append(d[3] == o.shape)
    return out


