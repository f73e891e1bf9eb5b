"""A procedurally generated image-caption dataset with hierarchical captions.

Each image (64x64 by default) shows a main shape and, in most images, a second one, on a
coloured background. Its caption adds one sentence of detail per level:

  1. the main shape:          "A large red circle."
  2. where it is:             "It is in the top left of the picture."
  3. the second shape:        "Below it there is a small blue square." (or "It is alone.")
  4. the background:          "The background is gray."

so shorter prefixes are true but less complete descriptions (what HiMo@K measures).
Written as open_clip's CSV dataset (tab separated, columns filepath and title).
"""
from __future__ import annotations

import csv
import random
from dataclasses import dataclass
from pathlib import Path

from PIL import Image, ImageDraw

COLORS = {"red": (220, 40, 40), "green": (40, 170, 60), "blue": (40, 80, 220),
          "yellow": (230, 210, 40), "purple": (140, 60, 180), "orange": (240, 140, 30)}
BACKGROUNDS = {"black": (15, 15, 15), "gray": (128, 128, 128), "white": (245, 245, 245)}
SHAPES = ("circle", "square", "triangle")
SIZES = {"small": 0.16, "large": 0.3}
ROWS = ("top", "middle", "bottom")
COLS = ("left", "center", "right")


@dataclass
class Scene:
    shape: str
    color: str
    size: str
    row: int
    col: int
    background: str
    second: tuple | None  # (shape, color, size, row, col) or None

    def caption(self) -> str:
        where = "center" if (self.row, self.col) == (1, 1) else \
            f"{ROWS[self.row]} {COLS[self.col]}".replace("middle center", "center")
        s = [f"A {self.size} {self.color} {self.shape}.", f"It is in the {where} of the picture."]
        if self.second is None:
            s.append("It is alone.")
        else:
            shape, color, size, row, col = self.second
            s.append(f"{_relation(self.row, self.col, row, col)} it there is a {size} {color} {shape}.")
        s.append(f"The background is {self.background}.")
        return " ".join(s)


def _relation(r0, c0, r1, c1) -> str:
    if r1 != r0:
        return "Below" if r1 > r0 else "Above"
    return "To the right of" if c1 > c0 else "To the left of"


def random_scene(rng: random.Random) -> Scene:
    cells = [(r, c) for r in range(3) for c in range(3)]
    (row, col), (row2, col2) = rng.sample(cells, 2)
    second = None
    if rng.random() < 0.8:
        second = (rng.choice(SHAPES), rng.choice(list(COLORS)), rng.choice(list(SIZES)), row2, col2)
    return Scene(rng.choice(SHAPES), rng.choice(list(COLORS)), rng.choice(list(SIZES)), row, col,
                 rng.choice(list(BACKGROUNDS)), second)


def _draw(draw: ImageDraw.ImageDraw, shape, color, size, row, col, px, rng):
    cell = px / 3
    r = SIZES[size] * px / 2 * (1 + 0.1 * rng.uniform(-1, 1))
    cx = (col + 0.5) * cell + rng.uniform(-0.1, 0.1) * cell
    cy = (row + 0.5) * cell + rng.uniform(-0.1, 0.1) * cell
    fill = tuple(min(255, max(0, v + rng.randint(-20, 20))) for v in COLORS[color])
    box = [cx - r, cy - r, cx + r, cy + r]
    if shape == "circle":
        draw.ellipse(box, fill=fill)
    elif shape == "square":
        draw.rectangle(box, fill=fill)
    else:
        draw.polygon([(cx, cy - r), (cx - r, cy + r), (cx + r, cy + r)], fill=fill)


def render(scene: Scene, rng: random.Random, px: int = 64) -> Image.Image:
    img = Image.new("RGB", (px, px), BACKGROUNDS[scene.background])
    draw = ImageDraw.Draw(img)
    _draw(draw, scene.shape, scene.color, scene.size, scene.row, scene.col, px, rng)
    if scene.second is not None:
        _draw(draw, *scene.second, px, rng)
    return img


def write_split(root: Path, name: str, n: int, seed: int, px: int = 64) -> Path:
    """Render ``n`` scenes under root/name/ and write root/name.csv; returns the CSV path."""
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    rng = random.Random(seed)
    folder = root / name
    folder.mkdir(parents=True, exist_ok=True)
    path = root / f"{name}.csv"
    with open(path, "w", newline="") as f:
        w = csv.writer(f, delimiter="\t")
        w.writerow(["filepath", "title"])
        for i in range(n):
            scene = random_scene(rng)
            file = folder / f"{i:06d}.png"
            render(scene, rng, px).save(file)
            w.writerow([str(file.resolve()), scene.caption()])
    return path


def read_split(path: Path) -> list[tuple[str, str]]:
    with open(path, newline="") as f:
        rows = list(csv.reader(f, delimiter="\t"))
    return [(r[0], r[1]) for r in rows[1:]]
