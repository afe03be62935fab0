"""Procedural scenes of the tiny world: coloured shapes on a 3x3 grid.

A scene is 1-4 objects in distinct cells of a 3x3 grid on a plain background. Each object
has a shape, a colour and a size. Everything is drawn from a numpy Generator, so a scene is a
pure function of its seed. The grid is aligned to the vision tower's patches (each cell is
an integer number of patches), so every image token sees exactly one cell.
"""

from __future__ import annotations

import dataclasses

import numpy as np
from PIL import Image, ImageDraw

SHAPES = ("circle", "square", "triangle")
COLOURS = {
    "red": (220, 30, 30),
    "green": (30, 170, 40),
    "blue": (40, 70, 230),
    "yellow": (235, 215, 20),
    "purple": (140, 40, 180),
    "orange": (245, 130, 20),
}
BACKGROUNDS = {"black": (0, 0, 0), "gray": (128, 128, 128), "white": (255, 255, 255)}
SIZES = {"small": 0.5, "large": 0.85}  # side of the object's box, as a fraction of a cell
# Row-major cell names; index = 3 * row + col.
CELLS = (
    "top left", "top middle", "top right",
    "middle left", "center", "middle right",
    "bottom left", "bottom middle", "bottom right",
)
MAX_OBJECTS = 4


@dataclasses.dataclass(frozen=True)
class Obj:
    shape: str
    colour: str
    size: str
    cell: int  # 0..8, row-major


@dataclasses.dataclass(frozen=True)
class Scene:
    background: str
    objects: tuple[Obj, ...]  # sorted by cell: reading order == image-token order

    def at(self, cell: int) -> Obj | None:
        return next((o for o in self.objects if o.cell == cell), None)


def sample_scene(rng: np.random.Generator) -> Scene:
    n = int(rng.integers(1, MAX_OBJECTS + 1))
    cells = sorted(int(c) for c in rng.choice(9, size=n, replace=False))
    objs = tuple(
        Obj(
            shape=SHAPES[rng.integers(len(SHAPES))],
            colour=list(COLOURS)[rng.integers(len(COLOURS))],
            size=list(SIZES)[rng.integers(len(SIZES))],
            cell=c,
        )
        for c in cells
    )
    return Scene(background=list(BACKGROUNDS)[rng.integers(len(BACKGROUNDS))], objects=objs)


def render(scene: Scene, image_size: int, rng: np.random.Generator | None = None) -> Image.Image:
    """Draw `scene` as an RGB image of side `image_size` (a multiple of 3).

    `rng` adds a small jitter of each object inside its cell (never crossing the cell).
    """
    return render_with_mask(scene, image_size, rng)[0]


def render_with_mask(scene: Scene, image_size: int, rng: np.random.Generator | None = None):
    """(image, mask): mask [S, S] uint8 holds 1 + the index of the object drawn at each pixel."""
    assert image_size % 3 == 0, "the 3x3 grid must tile the image exactly"
    cell = image_size // 3
    img = Image.new("RGB", (image_size, image_size), BACKGROUNDS[scene.background])
    mask = Image.new("L", (image_size, image_size), 0)
    draw, mdraw = ImageDraw.Draw(img), ImageDraw.Draw(mask)
    for k, o in enumerate(scene.objects):
        side = SIZES[o.size] * cell
        slack = (cell - side) / 2
        jx, jy = (rng.uniform(-slack / 2, slack / 2, size=2) if rng is not None else (0.0, 0.0))
        cx = (o.cell % 3 + 0.5) * cell + jx
        cy = (o.cell // 3 + 0.5) * cell + jy
        h = side / 2
        box = (cx - h, cy - h, cx + h, cy + h)
        for d, fill in ((draw, COLOURS[o.colour]), (mdraw, k + 1)):
            if o.shape == "circle":
                d.ellipse(box, fill=fill)
            elif o.shape == "square":
                d.rectangle(box, fill=fill)
            elif o.shape == "triangle":
                d.polygon([(cx, cy - h), (cx + h, cy + h), (cx - h, cy + h)], fill=fill)
            else:  # pragma: no cover - SHAPES is closed
                raise ValueError(f"unknown shape {o.shape!r}")
    return img, np.asarray(mask)


def blank_image(image_size: int) -> Image.Image:
    """A uniform mid-gray image: the 'no information' control for image-dependence checks."""
    return Image.new("RGB", (image_size, image_size), (128, 128, 128))
