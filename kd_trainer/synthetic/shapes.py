"""SynthShapes: a small image-classification set the project generates, for the classification example.

Each class is a (shape, colour) pair drawn at a random position, size and rotation on a noisy
background, so a network has to look at both the outline and the colour. Written to disk as PNG
files in the ImageFolder layout (``<root>/SynthShapes/{train,test}/<class>/<n>.png``, read by
:class:`kd_trainer.data.shapes.ShapesDataset`), seeded and byte-identical between runs, and
reused when the same arguments produced it before.
"""

from __future__ import annotations

import math
import random
from pathlib import Path
from typing import Any

from PIL import Image, ImageDraw

from kd_trainer.synthetic.generated import already_generated, mark_generated

SHAPES = ("circle", "square", "triangle", "cross", "ring")
COLOURS = {"red": (220, 40, 40), "green": (40, 180, 60), "blue": (50, 80, 220), "yellow": (230, 210, 40)}
META = "shapes_meta.json"


def class_names(num_classes: int) -> list[str]:
    names = [f"{c}_{s}" for s in SHAPES for c in COLOURS]
    if not 2 <= num_classes <= len(names):
        raise ValueError(f"num_classes must be between 2 and {len(names)}, got {num_classes}")
    return names[:num_classes]


def _draw(name: str, size: int, rng: random.Random) -> Image.Image:
    colour_name, shape = name.split("_")
    noise = [rng.randint(60, 200) for _ in range(3)]
    img = Image.new("RGB", (size, size), tuple(noise))
    d = ImageDraw.Draw(img)
    for _ in range(6):  # clutter, so the background is not a cue
        x, y = rng.randint(0, size), rng.randint(0, size)
        d.line([(x, y), (x + rng.randint(-size, size), y + rng.randint(-size, size))],
               fill=tuple(rng.randint(60, 200) for _ in range(3)), width=1)
    r = rng.uniform(0.22, 0.38) * size
    cx, cy = rng.uniform(r, size - r), rng.uniform(r, size - r)
    colour = tuple(min(255, max(0, v + rng.randint(-25, 25))) for v in COLOURS[colour_name])
    angle = rng.uniform(0, 2 * math.pi)
    if shape == "circle":
        d.ellipse([cx - r, cy - r, cx + r, cy + r], fill=colour)
    elif shape == "ring":
        d.ellipse([cx - r, cy - r, cx + r, cy + r], outline=colour, width=max(2, int(r / 3)))
    elif shape == "cross":
        w = r / 3
        for a in (angle, angle + math.pi / 2):
            dx, dy = math.cos(a), math.sin(a)
            d.line([(cx - r * dx, cy - r * dy), (cx + r * dx, cy + r * dy)], fill=colour, width=max(2, int(w)))
    else:
        n = 4 if shape == "square" else 3
        pts = [(cx + r * math.cos(angle + 2 * math.pi * k / n), cy + r * math.sin(angle + 2 * math.pi * k / n))
               for k in range(n)]
        d.polygon(pts, fill=colour)
    return img


def check_synth_shapes_args(num_classes: int, train_per_class: int, test_per_class: int, image_size: int) -> None:
    """Refuse arguments :func:`make_synth_shapes` cannot generate from (the recipe's ``data.shapes`` calls it too)."""
    class_names(num_classes)  # checks num_classes
    if train_per_class < 1 or test_per_class < 1:
        raise ValueError(f"SynthShapes needs train_per_class and test_per_class >= 1 (an empty split has nothing to "
                         f"train or test on), got {train_per_class}, {test_per_class}")
    if image_size < 1:
        raise ValueError(f"SynthShapes image_size must be a positive number of pixels, got {image_size}")


def make_synth_shapes(out_dir: str | Path, *, num_classes: int = 10, train_per_class: int = 60,
                      test_per_class: int = 20, image_size: int = 32, seed: int = 0) -> Path:
    """Write the set (or reuse it if these arguments wrote it); returns ``out_dir``."""
    out = Path(out_dir)
    args: dict[str, Any] = {"num_classes": num_classes, "train_per_class": train_per_class,
                            "test_per_class": test_per_class, "image_size": image_size, "seed": seed}
    check_synth_shapes_args(num_classes, train_per_class, test_per_class, image_size)
    if already_generated(out, META, args, "SynthShapes"):
        return out
    names = class_names(num_classes)
    for split, per_class in (("train", train_per_class), ("test", test_per_class)):
        for ci, name in enumerate(names):
            folder = out / split / name
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(per_class):
                rng = random.Random(f"{seed}:{split}:{ci}:{i}")
                _draw(name, image_size, rng).save(folder / f"{i:04d}.png", optimize=False)
    mark_generated(out, META, args)
    return out
