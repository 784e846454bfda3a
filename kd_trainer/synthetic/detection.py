"""SynthDet: a small object-detection set the project generates, for the detection example.

Each image holds several objects at random positions and scales on a noisy, cluttered
background; an object's class is a (colour, shape) pair of SynthShapes (:func:`class_names`), so
a detector has to find the objects, then read both outline and colour. Boxes are the tight
``x0, y0, x1, y1`` pixel extents of what was drawn, and objects overlap little (IoU below
``MAX_OVERLAP``), so every box is visible enough to be found.

On disk (``<root>/SynthDet``)::

    train/0000.png ...                        the images
    train.json, test.json                     COCO-style annotations (images, annotations, categories)
    synthdet_meta.json                        the arguments that wrote the set (and the generator version)

Seeded through private ``random.Random`` instances keyed by (seed, split, image), never global
state: the same arguments give byte-identical files, and a folder written with the same arguments
is reused while one written with others is refused, as SynthShapes and SynthPEDES do.

:class:`kd_trainer.data.detection.SynthDetDataset` reads it back.
"""

from __future__ import annotations

import json
import math
import random
from pathlib import Path
from typing import Any

from PIL import Image, ImageDraw

from kd_trainer.synthetic.generated import already_generated, mark_generated
from kd_trainer.synthetic.shapes import COLOURS, class_names

__all__ = ["GENERATOR_VERSION", "META_FILE", "check_synth_det_args", "make_synth_det"]

# Bumped whenever the same arguments would draw different files, so an old copy is refused.
GENERATOR_VERSION = 1
META_FILE = "synthdet_meta.json"
MAX_OVERLAP = 0.2  # IoU above which a new object is redrawn elsewhere
MIN_SIZE_FRACTION = 0.12  # an object's extent, as a fraction of the image side
MAX_SIZE_FRACTION = 0.4


def _iou(a: list[float], b: list[float]) -> float:
    ix = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    iy = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = ix * iy
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union > 0 else 0.0


def _draw_object(d: ImageDraw.ImageDraw, name: str, cx: float, cy: float, r: float, rng: random.Random,
                 size: int) -> list[float]:
    """Draw one object of class ``name`` (``colour_shape``) centred at (cx, cy) with radius r;
    returns its box ``[x0, y0, x1, y1]`` clipped to the image."""
    colour_name, shape = name.split("_")
    colour = tuple(min(255, max(0, v + rng.randint(-25, 25))) for v in COLOURS[colour_name])
    angle = rng.uniform(0, 2 * math.pi)
    if shape in ("circle", "ring"):
        box = [cx - r, cy - r, cx + r, cy + r]
        if shape == "circle":
            d.ellipse(box, fill=colour)
        else:
            d.ellipse(box, outline=colour, width=max(2, int(r / 3)))
    elif shape == "cross":
        w = max(2, int(r / 3))
        xs, ys = [], []
        for a in (angle, angle + math.pi / 2):
            dx, dy = math.cos(a), math.sin(a)
            ends = [(cx - r * dx, cy - r * dy), (cx + r * dx, cy + r * dy)]
            d.line(ends, fill=colour, width=w)
            # a line w wide reaches w/2 beyond its axis, across the axis
            for x, y in ends:
                xs += [x - w / 2 * abs(dy), x + w / 2 * abs(dy)]
                ys += [y - w / 2 * abs(dx), y + w / 2 * abs(dx)]
        box = [min(xs), min(ys), max(xs), max(ys)]
    else:
        n = 4 if shape == "square" else 3
        pts = [(cx + r * math.cos(angle + 2 * math.pi * k / n), cy + r * math.sin(angle + 2 * math.pi * k / n))
               for k in range(n)]
        d.polygon(pts, fill=colour)
        box = [min(p[0] for p in pts), min(p[1] for p in pts), max(p[0] for p in pts), max(p[1] for p in pts)]
    return [max(0.0, box[0]), max(0.0, box[1]), min(float(size), box[2]), min(float(size), box[3])]


def _draw_image(names: list[str], size: int, max_objects: int, rng: random.Random) -> tuple[Image.Image, list[dict]]:
    img = Image.new("RGB", (size, size), tuple(rng.randint(60, 200) for _ in range(3)))
    d = ImageDraw.Draw(img)
    for _ in range(8):  # clutter lines, so edges alone do not give an object away
        x, y = rng.randint(0, size), rng.randint(0, size)
        d.line([(x, y), (x + rng.randint(-size, size), y + rng.randint(-size, size))],
               fill=tuple(rng.randint(60, 200) for _ in range(3)), width=1)
    objects: list[dict] = []
    for _ in range(rng.randint(1, max_objects)):
        label = rng.randrange(len(names))
        for _attempt in range(20):
            r = rng.uniform(MIN_SIZE_FRACTION, MAX_SIZE_FRACTION) * size / 2
            cx, cy = rng.uniform(r, size - r), rng.uniform(r, size - r)
            guess = [cx - r, cy - r, cx + r, cy + r]
            if all(_iou(guess, o["box"]) < MAX_OVERLAP for o in objects):
                box = _draw_object(d, names[label], cx, cy, r, rng, size)
                objects.append({"box": box, "label": label})
                break
    return img, objects


def check_synth_det_args(num_classes: int, train_images: int, test_images: int, image_size: int,
                         max_objects: int) -> None:
    """Refuse arguments :func:`make_synth_det` cannot generate from (the recipe's ``data.det`` calls it too)."""
    if image_size < 32:
        raise ValueError(f"SynthDet image_size must be at least 32 pixels (a ResNet+FPN's coarsest level is "
                         f"1/32 of it), got {image_size}")
    if max_objects < 1 or train_images < 1 or test_images < 1:
        raise ValueError(f"SynthDet needs max_objects, train_images and test_images >= 1, got {max_objects}, "
                         f"{train_images}, {test_images}")
    class_names(num_classes)  # checks num_classes


def make_synth_det(out_dir: str | Path, *, num_classes: int = 6, train_images: int = 400, test_images: int = 100,
                   image_size: int = 96, max_objects: int = 4, seed: int = 0) -> Path:
    """Write the set (or reuse it if these arguments wrote it); returns ``out_dir``.

    Category ids are ``1..num_classes`` (0 is the detector's background); their names are
    SynthShapes' ``colour_shape`` class names.
    """
    check_synth_det_args(num_classes, train_images, test_images, image_size, max_objects)
    names = class_names(num_classes)
    out = Path(out_dir)
    args: dict[str, Any] = {"num_classes": num_classes, "train_images": train_images, "test_images": test_images,
                            "image_size": image_size, "max_objects": max_objects, "seed": seed,
                            "generator_version": GENERATOR_VERSION}
    if already_generated(out, META_FILE, args, "SynthDet"):
        return out
    categories = [{"id": i + 1, "name": n} for i, n in enumerate(names)]
    for split, count in (("train", train_images), ("test", test_images)):
        (out / split).mkdir(parents=True, exist_ok=True)
        images, annotations = [], []
        for i in range(count):
            rng = random.Random(f"synthdet:{seed}:{split}:{i}")
            img, objects = _draw_image(names, image_size, max_objects, rng)
            file_name = f"{split}/{i:04d}.png"
            img.save(out / file_name, optimize=False)
            images.append({"id": i, "file_name": file_name, "height": image_size, "width": image_size})
            for o in objects:
                x0, y0, x1, y1 = (round(v, 2) for v in o["box"])
                annotations.append({"id": len(annotations) + 1, "image_id": i, "category_id": o["label"] + 1,
                                    "bbox": [x0, y0, round(x1 - x0, 2), round(y1 - y0, 2)],
                                    "area": round((x1 - x0) * (y1 - y0), 2), "iscrowd": 0})
        (out / f"{split}.json").write_text(json.dumps(
            {"images": images, "annotations": annotations, "categories": categories}))
    mark_generated(out, META_FILE, args)
    return out
