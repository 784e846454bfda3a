"""SynthPEDES: a procedurally drawn stand-in for CUHK-PEDES, small enough for CI and the demo.

    from kd_trainer.synthetic.pedes import make_synth_pedes
    root = make_synth_pedes("data/SynthPEDES", num_identities=400, seed=0)
    # root/reid_raw.json + root/imgs/synth/0001_00.png ... (the CUHK-PEDES layout)

Each identity is a tuple of clothing attributes (hair, upper and lower garment, shoes,
bag, hat, glasses) drawn from small palettes, so identities share attributes and a
partial description matches several of them, while the full tuple is unique, so a full
description matches exactly one. Every image of an identity redraws the same person
under a new pose, view, scale, position, background and lighting; each image gets two
captions written from templates with synonyms and a shuffled attribute order, some of
them mentioning only a few attributes (as human annotators often do).

Everything is seeded from ``seed`` through private ``random.Random`` / numpy Generator
instances keyed by (seed, purpose, pid, image), never global state, so the same
arguments give byte-identical JSON and identical pixels, and changing how images are
drawn never changes which identities or captions exist.
"""

from __future__ import annotations

import colorsys
import json
import math
import os
import pathlib
import random
import re
import shutil
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
from PIL import Image, ImageDraw

__all__ = [
    "ANNOTATION_FILE",
    "COLOUR_RGB",
    "COLOUR_WORDS",
    "GENERATOR_VERSION",
    "IMAGE_SUBDIR",
    "META_FILE",
    "Identity",
    "check_synth_pedes_args",
    "make_synth_pedes",
    "sample_identities",
]

# Bumped whenever the same arguments would produce different files, so an old cached copy
# is reported as stale instead of silently reused.
GENERATOR_VERSION = 1

ANNOTATION_FILE = "reid_raw.json"
META_FILE = "synth_meta.json"
IMAGE_SUBDIR = "synth"  # images live under <out_dir>/imgs/synth/, file_path is relative to imgs/

# Saturated, well separated colours: after resizing to 64x32 and a lighting change the
# garment colour must still be the nearest palette entry.
COLOUR_RGB: dict[str, tuple[int, int, int]] = {
    "black": (28, 28, 30),
    "white": (236, 236, 232),
    "gray": (128, 128, 130),
    "red": (200, 32, 36),
    "blue": (32, 70, 190),
    "green": (34, 140, 56),
    "yellow": (236, 206, 40),
    "orange": (240, 128, 24),
    "purple": (118, 44, 150),
    "pink": (240, 140, 184),
    "brown": (112, 70, 36),
    "blonde": (222, 190, 112),  # hair only
}

# The words a caption may use for each colour; tests and analyses match captions with these.
COLOUR_WORDS: dict[str, tuple[str, ...]] = {
    "black": ("black",),
    "white": ("white",),
    "gray": ("gray", "grey"),
    "red": ("red", "bright red"),
    "blue": ("blue",),
    "green": ("green",),
    "yellow": ("yellow",),
    "orange": ("orange",),
    "purple": ("purple", "violet"),
    "pink": ("pink",),
    "brown": ("brown",),
    "blonde": ("blonde", "blond", "fair"),
}

_UPPER_COLOURS = ("black", "white", "gray", "red", "blue", "green", "yellow", "orange", "purple", "pink")
_LOWER_COLOURS = ("black", "blue", "gray", "white", "brown", "red", "green")
_SHOE_COLOURS = ("black", "white", "brown", "red")
_BAG_COLOURS = ("black", "brown", "red", "blue", "white")
_HAT_COLOURS = ("black", "white", "red", "blue")
_HAIR_COLOURS = ("black", "brown", "blonde", "gray")
_INNER_COLOURS = ("white", "gray", "black")  # the shirt showing under an open jacket; never captioned
_SKIN_TONES = ((241, 200, 170), (222, 172, 130), (176, 122, 84), (110, 74, 50))

_DARK = {"black", "blue", "purple", "brown", "red", "green", "gray"}


@dataclass(frozen=True)
class Identity:
    """One synthetic person: every attribute a full caption describes, plus an undescribed skin tone.

    ``None`` means the item is absent (no hair colour when bald, no lower garment under a
    dress, no bag/hat colour without a bag/hat).
    """

    gender: str  # man | woman
    hair_style: str  # short | long | ponytail | bald
    hair_colour: str | None
    upper_type: str  # tshirt | longsleeve | jacket | coat | dress
    upper_colour: str
    upper_pattern: str  # plain | stripes | logo
    lower_type: str | None  # trousers | shorts | skirt | None (dress)
    lower_colour: str | None
    shoe_colour: str
    bag_type: str  # none | backpack | handbag | shoulder
    bag_colour: str | None
    hat_colour: str | None
    glasses: bool
    skin: int  # index into the skin tones; not described, so not part of the unique key
    inner_colour: str  # under an open jacket; not described

    def key(self) -> tuple[Any, ...]:
        """The described attributes: unique across the identities of one dataset."""
        d = asdict(self)
        del d["skin"], d["inner_colour"]
        return tuple(d.values())


# ----------------------------------------------------------------------------- identities


def _pick(rng: random.Random, weighted: dict[str, float]) -> str:
    return rng.choices(list(weighted), weights=list(weighted.values()))[0]


def _draw_identity(rng: random.Random) -> Identity:
    gender = rng.choice(("man", "woman"))
    woman = gender == "woman"
    hair_style = _pick(rng, {"short": 0.25, "long": 0.45, "ponytail": 0.3} if woman
                       else {"short": 0.6, "bald": 0.15, "long": 0.12, "ponytail": 0.13})
    hair_colour = None if hair_style == "bald" else rng.choice(_HAIR_COLOURS)
    upper_type = _pick(rng, {"tshirt": 0.25, "longsleeve": 0.2, "jacket": 0.2, "coat": 0.15, "dress": 0.2} if woman
                       else {"tshirt": 0.3, "longsleeve": 0.25, "jacket": 0.25, "coat": 0.2})
    upper_colour = rng.choice(_UPPER_COLOURS)
    upper_pattern = _pick(rng, {"plain": 0.65, "stripes": 0.2, "logo": 0.15})
    if upper_type == "dress":
        lower_type = lower_colour = None
    else:
        lower_type = _pick(rng, {"trousers": 0.6, "shorts": 0.2, "skirt": 0.2} if woman
                           else {"trousers": 0.75, "shorts": 0.25})
        lower_colour = rng.choice(_LOWER_COLOURS)
    shoe_colour = rng.choice(_SHOE_COLOURS)
    bag_type = _pick(rng, {"none": 0.3, "backpack": 0.3, "handbag": 0.15 if not woman else 0.2,
                           "shoulder": 0.25 if not woman else 0.2})
    bag_colour = None if bag_type == "none" else rng.choice(_BAG_COLOURS)
    hat_colour = rng.choice(_HAT_COLOURS) if rng.random() < 0.2 else None
    glasses = rng.random() < 0.2
    return Identity(gender, hair_style, hair_colour, upper_type, upper_colour, upper_pattern, lower_type,
                    lower_colour, shoe_colour, bag_type, bag_colour, hat_colour, glasses,
                    skin=rng.randrange(len(_SKIN_TONES)), inner_colour=rng.choice(_INNER_COLOURS))


def sample_identities(num_identities: int, seed: int = 0,
                      exclude: frozenset[tuple[Any, ...]] = frozenset()) -> list[Identity]:
    """The identities ``make_synth_pedes(..., num_identities, seed=seed)`` draws; pid ``i + 1`` is item ``i``.

    Attributes are drawn independently per identity and redrawn until the described
    attributes (``Identity.key()``) are unique, and not among ``exclude`` (the keys of
    another data set that this one must not share a person with).
    """
    rng = random.Random(f"synthpedes:{seed}:identities")
    out: list[Identity] = []
    seen: set[tuple[Any, ...]] = set(exclude)
    attempts = 0
    while len(out) < num_identities:
        attempts += 1
        if attempts > 1000 * max(num_identities, 1):  # the attribute space is ~10^7; only absurd sizes hit this
            raise ValueError(f"cannot draw {num_identities} identities with unique attributes")
        ident = _draw_identity(rng)
        if ident.key() not in seen:
            seen.add(ident.key())
            out.append(ident)
    return out


# ----------------------------------------------------------------------------- captions

_SUBJECTS = {
    "man": ("A man", "A young man", "The man", "A guy", "A male pedestrian", "This man", "The person",
            "A pedestrian"),
    "woman": ("A woman", "A young woman", "The woman", "A lady", "A female pedestrian", "This woman",
              "The person", "A pedestrian"),
}
_GARMENT_WORDS = {
    "tshirt": ("t-shirt", "tee", "short-sleeved shirt", "short-sleeved top"),
    "longsleeve": ("long-sleeved shirt", "long-sleeve top", "long-sleeve shirt"),
    "jacket": ("jacket", "zip-up jacket", "open jacket"),
    "coat": ("coat", "long coat", "overcoat"),
    "dress": ("dress", "knee-length dress"),
}


def _colour(rng: random.Random, name: str) -> str:
    return rng.choice(COLOUR_WORDS[name])


def _a(phrase: str) -> str:
    return ("an " if phrase[0] in "aeiou" else "a ") + phrase


def _join(items: list[str]) -> str:
    return items[0] if len(items) == 1 else ", ".join(items[:-1]) + " and " + items[-1]


def _hair_phrase(p: Identity, rng: random.Random) -> str:
    if p.hair_style == "bald":
        return rng.choice(("a bald head", "a shaved head"))
    c = _colour(rng, p.hair_colour)
    return rng.choice({
        "short": (f"short {c} hair", f"{c} short hair", f"cropped {c} hair"),
        "long": (f"long {c} hair", f"long {c} hair down to the shoulders", f"shoulder-length {c} hair"),
        "ponytail": (f"{c} hair in a ponytail", f"{c} hair tied back in a ponytail", _a(f"{c} ponytail")),
    }[p.hair_style])


def _upper_phrase(p: Identity, rng: random.Random) -> str:
    c, g = _colour(rng, p.upper_colour), rng.choice(_GARMENT_WORDS[p.upper_type])
    contrast = "white" if p.upper_colour in _DARK else "black"
    if p.upper_pattern == "stripes":
        return rng.choice((_a(f"{c} {g} with {contrast} stripes"), _a(f"striped {c} {g}")))
    if p.upper_pattern == "logo":
        return rng.choice((_a(f"{c} {g} with a logo on the front"), _a(f"{c} {g} with a {contrast} logo"),
                           _a(f"{c} {g} with a small print on the chest")))
    return _a(f"{c} {g}")


def _lower_phrase(p: Identity, rng: random.Random) -> str:
    c = _colour(rng, p.lower_colour)
    if p.lower_type == "trousers":
        options = [f"{c} trousers", f"{c} pants", f"a pair of {c} trousers", f"long {c} pants"]
        if p.lower_colour in ("blue", "black"):
            options.append(f"{c} jeans")
        return rng.choice(options)
    if p.lower_type == "shorts":
        return rng.choice((f"{c} shorts", f"a pair of {c} shorts", f"short {c} pants"))
    return rng.choice((_a(f"{c} skirt"), _a(f"knee-length {c} skirt")))


def _shoes_phrase(p: Identity, rng: random.Random) -> str:
    c = _colour(rng, p.shoe_colour)
    return rng.choice((f"{c} shoes", f"{c} sneakers", f"a pair of {c} shoes"))


def _bag_phrase(p: Identity, rng: random.Random, pos: str) -> str:
    c = _colour(rng, p.bag_colour)
    return rng.choice({
        "backpack": (_a(f"{c} backpack"), _a(f"{c} rucksack")),
        "handbag": (_a(f"{c} handbag"), _a(f"small {c} bag in {pos} hand")),
        "shoulder": (_a(f"{c} shoulder bag"), _a(f"{c} bag over {pos} shoulder"), _a(f"{c} crossbody bag")),
    }[p.bag_type])


def _caption(p: Identity, rng: random.Random, partial: bool) -> str:
    """One caption; ``partial`` mentions a random 1-3 of the identity's attributes instead of all."""
    he, his = ("He", "his") if p.gender == "man" else ("She", "her")
    facets = ["hair", "upper", "shoes"]
    facets += ["lower"] if p.lower_type else []
    facets += ["bag"] if p.bag_type != "none" else []
    facets += ["hat"] if p.hat_colour else []
    facets += ["glasses"] if p.glasses else []
    if partial:
        # Annotators who write short captions usually start with the most visible garment.
        chosen = set(rng.sample(facets, rng.randint(1, min(3, len(facets)))))
        if rng.random() < 0.5:
            chosen.add("upper")
    else:
        chosen = set(facets)

    wear: list[str] = []
    for f in facets:  # fixed iteration order keeps the rng stream, and so the output, deterministic
        if f not in chosen:
            continue
        if f == "upper":
            wear.append(_upper_phrase(p, rng))
        elif f == "lower":
            wear.append(_lower_phrase(p, rng))
        elif f == "shoes":
            wear.append(_shoes_phrase(p, rng))
        elif f == "hat":
            wear.append(rng.choice((_a(f"{_colour(rng, p.hat_colour)} cap"),
                                    _a(f"{_colour(rng, p.hat_colour)} baseball cap"),
                                    _a(f"{_colour(rng, p.hat_colour)} hat"))))
        elif f == "glasses":
            wear.append(rng.choice(("glasses", "a pair of glasses", "spectacles")))
    rng.shuffle(wear)
    hair = _hair_phrase(p, rng) if "hair" in chosen else None
    bag = _bag_phrase(p, rng, his) if "bag" in chosen else None
    subj = rng.choice(_SUBJECTS[p.gender])

    sentences: list[str] = []
    if bag and wear and rng.random() < 0.25:  # the bag leads, the rest follows
        sentences.append(f"{subj} carrying {bag} is wearing {_join(wear)}.")
        sentences += [f"{he} has {hair}."] if hair else []
        bag = None
    elif wear and hair:
        form = rng.randrange(4 if len(wear) >= 2 else 3)
        if form == 0:
            sentences.append(f"{subj} with {hair} wearing {_join(wear)}.")
        elif form == 1:
            sentences += [f"{subj} is wearing {_join(wear)}.", f"{he} has {hair}."]
        elif form == 2:
            sentences.append(f"{subj} in {_join(wear)}, with {hair}.")
        else:
            k = rng.randint(1, len(wear) - 1)
            sentences += [f"{subj} has {hair}.",
                          f"{he} is dressed in {_join(wear[:k])} and also wears {_join(wear[k:])}."]
    elif wear:
        verb = rng.choice(("wearing", "is wearing", "in", "dressed in", "who wears"))
        sentences.append(f"{subj} {verb} {_join(wear)}.")
    elif hair:
        sentences.append(rng.choice((f"{subj} with {hair}.", f"{subj} has {hair}.")))
    if bag:
        verbs = ("carries", "is carrying", "has") + (("is holding",) if p.bag_type == "handbag" else ())
        sentences.append(f"{he} {rng.choice(verbs)} {bag}." if sentences else f"{subj} carrying {bag}.")
    elif not partial and p.bag_type == "none" and rng.random() < 0.4:
        sentences.append(rng.choice((f"{he} is not carrying a bag.", f"{he} has nothing in {his} hands.",
                                     f"{he} carries no bag.")))
    return " ".join(sentences)


def _tokens(caption: str) -> list[str]:
    return re.findall(r"[a-z0-9]+(?:[-'][a-z0-9]+)*", caption.lower())


# ----------------------------------------------------------------------------- drawing

_SS = 2  # draw at twice the size and downsample: cheap antialiasing for thin parts (straps, limbs)


def _shade(rgb: tuple[int, int, int], f: float) -> tuple[int, int, int]:
    return tuple(max(0, min(255, int(round(c * f)))) for c in rgb)  # type: ignore[return-value]


class _Figure:
    """Maps body coordinates (person height 1, feet at y=1, centre x=0) to canvas pixels."""

    def __init__(self, draw: ImageDraw.ImageDraw, cx: float, top: float, height: float):
        self.d, self.cx, self.top, self.h = draw, cx, top, height

    def p(self, x: float, y: float) -> tuple[float, float]:
        return (self.cx + x * self.h, self.top + y * self.h)

    def poly(self, pts: list[tuple[float, float]], fill: tuple[int, int, int]) -> None:
        self.d.polygon([self.p(x, y) for x, y in pts], fill=fill)

    def ellipse(self, x: float, y: float, rx: float, ry: float, fill: tuple[int, int, int]) -> None:
        (x0, y0), (x1, y1) = self.p(x - rx, y - ry), self.p(x + rx, y + ry)
        self.d.ellipse([x0, y0, x1, y1], fill=fill)

    def chord(self, x: float, y: float, rx: float, ry: float, start: float, end: float,
              fill: tuple[int, int, int]) -> None:
        (x0, y0), (x1, y1) = self.p(x - rx, y - ry), self.p(x + rx, y + ry)
        self.d.chord([x0, y0, x1, y1], start, end, fill=fill)

    def limb(self, a: tuple[float, float], b: tuple[float, float], w: float, fill: tuple[int, int, int]) -> None:
        """A straight segment ``w`` wide with rounded ends (arms, legs, straps)."""
        dx, dy = b[0] - a[0], b[1] - a[1]
        n = math.hypot(dx, dy) or 1.0
        ox, oy = -dy / n * w / 2, dx / n * w / 2
        self.poly([(a[0] + ox, a[1] + oy), (b[0] + ox, b[1] + oy), (b[0] - ox, b[1] - oy), (a[0] - ox, a[1] - oy)],
                  fill)
        self.ellipse(a[0], a[1], w / 2, w / 2, fill)
        self.ellipse(b[0], b[1], w / 2, w / 2, fill)

    def point_along(self, a: tuple[float, float], b: tuple[float, float], t: float) -> tuple[float, float]:
        return (a[0] + (b[0] - a[0]) * t, a[1] + (b[1] - a[1]) * t)


def _background(rng: random.Random, w: int, h: int) -> Image.Image:
    def muted() -> tuple[int, int, int]:
        r, g, b = colorsys.hsv_to_rgb(rng.random(), rng.uniform(0.03, 0.3), rng.uniform(0.35, 0.85))
        return (int(r * 255), int(g * 255), int(b * 255))

    kind = rng.choice(("solid", "gradient", "wall_floor", "wall_floor"))
    c0, c1 = muted(), muted()
    if kind == "gradient":
        t = np.linspace(0.0, 1.0, h, dtype=np.float32)[:, None, None]
        arr = (np.array(c0, np.float32) * (1 - t) + np.array(c1, np.float32) * t)
        img = Image.fromarray(np.broadcast_to(arr, (h, w, 3)).astype(np.uint8), "RGB")
    else:
        img = Image.new("RGB", (w, h), c0)
    d = ImageDraw.Draw(img)
    if kind == "wall_floor":
        d.rectangle([0, int(h * rng.uniform(0.6, 0.85)), w, h], fill=c1)
    for _ in range(rng.randint(0, 4)):  # clutter: windows, poles, bushes, kerbs
        c = muted()
        x0, y0 = rng.uniform(-0.2, 1.0) * w, rng.uniform(-0.1, 0.9) * h
        shape = rng.choice(("rect", "pole", "blob"))
        if shape == "rect":
            d.rectangle([x0, y0, x0 + rng.uniform(0.1, 0.5) * w, y0 + rng.uniform(0.05, 0.3) * h], fill=c)
        elif shape == "pole":
            d.rectangle([x0, 0, x0 + rng.uniform(0.02, 0.07) * w, h], fill=c)
        else:
            rx, ry = rng.uniform(0.1, 0.3) * w, rng.uniform(0.05, 0.15) * h
            d.ellipse([x0 - rx, y0 - ry, x0 + rx, y0 + ry], fill=c)
    return img


def _draw_person(d: ImageDraw.ImageDraw, p: Identity, view: str, rng: random.Random,
                 cx: float, top: float, height: float) -> None:
    """Draw ``p`` facing the camera (front), away (back) or to the right (side)."""
    f = _Figure(d, cx, top, height)
    rgb = COLOUR_RGB
    skin = _SKIN_TONES[p.skin]
    upper = rgb[p.upper_colour]
    lower = rgb[p.lower_colour] if p.lower_colour else upper
    shoe = rgb[p.shoe_colour]
    hair = rgb[p.hair_colour] if p.hair_colour else skin
    bag = rgb[p.bag_colour] if p.bag_colour else (0, 0, 0)
    contrast = rgb["white"] if p.upper_colour in _DARK else rgb["black"]
    side = view == "side"
    far = 0.78  # far limbs in the side view are shaded, as they would be in shadow

    # Pose: the side view shows the stride and arm swing; front/back mostly show legs apart.
    stride = rng.uniform(0.0, 0.2) if side else rng.uniform(0.0, 0.07)
    swing = math.radians(rng.uniform(-30, 30)) if side else math.radians(rng.uniform(4, 22))
    swing2 = math.radians(rng.uniform(4, 22))
    arm_len, leg_w, arm_w = 0.31, 0.08, 0.058
    sh_y, waist_y, hip_y, foot_y = 0.17, 0.47, 0.49, 0.955
    tw, ww = (0.07, 0.065) if side else (0.115, 0.092)  # half-widths at the shoulders and the waist

    # Legs: hips -> feet; trousers cover them, shorts/skirts/dress leave the shins bare.
    if side:
        legs = [((0.0, hip_y), (-stride, foot_y), far), ((0.0, hip_y), (stride, foot_y), 1.0)]
    else:
        legs = [((-0.045, hip_y), (-0.045 - stride, foot_y), 1.0), ((0.045, hip_y), (0.045 + stride, foot_y), 1.0)]
    leg_fill = lower if p.lower_type == "trousers" else skin
    if p.bag_type == "backpack" and side:
        f.poly([(-tw - 0.1, sh_y + 0.02), (-tw + 0.01, sh_y + 0.01), (-tw + 0.01, 0.43), (-tw - 0.1, 0.41)], bag)
    for a, b, k in legs:
        f.limb(a, b, leg_w, _shade(leg_fill, k))
        if p.lower_type == "shorts":
            f.limb(a, f.point_along(a, b, 0.45), leg_w + 0.012, _shade(lower, k))
        sx = 0.03 if side else 0.0  # shoes point the way the person faces
        f.ellipse(b[0] + sx, b[1] + 0.01, 0.05, 0.028, _shade(shoe, k))

    # Far arm (side view), drawn before the torso so the torso hides its shoulder.
    sleeve = {"tshirt": 0.35, "dress": 0.2}.get(p.upper_type, 1.0)

    def arm(shoulder: tuple[float, float], angle: float, k: float, outward: float) -> tuple[float, float]:
        hand = (shoulder[0] + outward * math.sin(angle) * arm_len, shoulder[1] + math.cos(angle) * arm_len)
        f.limb(shoulder, hand, arm_w, _shade(skin, k))
        f.limb(shoulder, f.point_along(shoulder, hand, sleeve), arm_w + 0.01, _shade(upper, k))
        return hand

    hands: list[tuple[float, float]] = []
    if side:
        hands.append(arm((0.0, sh_y + 0.02), -swing, far, 1.0))

    # Long hair hangs behind the shoulders in front and side views.
    if p.hair_style == "long" and view != "back":
        f.poly([(-0.065, 0.06), (0.065, 0.06), (0.075, 0.25), (-0.075, 0.25)] if not side
               else [(-0.07, 0.05), (0.02, 0.05), (0.0, 0.25), (-0.08, 0.25)], hair)

    # Lower garment over the legs: skirt, and the skirt part of a dress or coat.
    if p.lower_type == "skirt":
        f.poly([(-ww, waist_y - 0.01), (ww, waist_y - 0.01), (ww + 0.06, 0.68), (-ww - 0.06, 0.68)], lower)
    elif p.lower_type in ("trousers", "shorts"):
        f.poly([(-ww, waist_y - 0.01), (ww, waist_y - 0.01), (ww, hip_y + 0.05), (-ww, hip_y + 0.05)], lower)
    if p.upper_type in ("dress", "coat"):
        hem = 0.7 if p.upper_type == "dress" else 0.74
        flare = 0.07 if p.upper_type == "dress" else 0.035
        f.poly([(-ww, waist_y - 0.02), (ww, waist_y - 0.02), (ww + flare, hem), (-ww - flare, hem)], upper)

    # Torso.
    bottom = waist_y + (0.05 if p.upper_type == "jacket" else 0.0)
    torso = [(-tw, sh_y), (tw, sh_y), (ww, bottom), (-ww, bottom)]
    f.poly(torso, upper)
    f.ellipse(-tw + 0.02, sh_y + 0.02, 0.03, 0.025, upper)  # rounded shoulders
    f.ellipse(tw - 0.02, sh_y + 0.02, 0.03, 0.025, upper)
    if p.upper_pattern == "stripes":
        for i in range(4):
            y = sh_y + 0.06 + i * 0.07
            half = tw + (ww - tw) * (y - sh_y) / (bottom - sh_y)
            f.poly([(-half, y), (half, y), (half, y + 0.025), (-half, y + 0.025)], contrast)
    elif p.upper_pattern == "logo" and view == "front":
        f.ellipse(0.0 if p.upper_type != "jacket" else 0.06, sh_y + 0.11, 0.035, 0.03, contrast)
    if p.upper_type == "jacket" and view == "front":  # the open front, drawn over the pattern on the jacket
        f.poly([(-0.025, sh_y), (0.025, sh_y), (0.02, bottom), (-0.02, bottom)], rgb[p.inner_colour])

    # Near arms.
    if side:
        hands.append(arm((0.0, sh_y + 0.02), swing, 1.0, 1.0))
    else:
        hands.append(arm((-tw + 0.015, sh_y + 0.02), swing, 1.0, -1.0))
        hands.append(arm((tw - 0.015, sh_y + 0.02), swing2, 1.0, 1.0))

    # Neck, head, face, hair.
    f.poly([(-0.025, 0.12), (0.025, 0.12), (0.025, sh_y + 0.01), (-0.025, sh_y + 0.01)], skin)
    hx = 0.01 if side else 0.0
    f.ellipse(hx, 0.075, 0.052 if side else 0.055, 0.068, skin)
    if p.hair_style != "bald":
        if view == "back":
            f.chord(hx, 0.075, 0.057, 0.07, 150, 390, hair)  # hair covers the back of the head
            if p.hair_style == "long":
                f.poly([(-0.06, 0.08), (0.06, 0.08), (0.07, 0.26), (-0.07, 0.26)], hair)
        elif side:
            f.chord(hx, 0.075, 0.056, 0.07, 150, 330, hair)
            f.ellipse(hx - 0.035, 0.08, 0.025, 0.04, hair)
        else:
            f.chord(hx, 0.073, 0.058, 0.07, 175, 365, hair)
        if p.hair_style == "ponytail":
            if side:
                f.limb((hx - 0.05, 0.07), (hx - 0.08, 0.17), 0.035, hair)
            elif view == "back":
                f.limb((0.0, 0.1), (0.0, 0.2), 0.04, hair)
            else:
                f.limb((0.05, 0.06), (0.075, 0.15), 0.03, hair)  # glimpse of the tail beside the head
    if p.hat_colour:
        hat = rgb[p.hat_colour]
        f.chord(hx, 0.07, 0.06, 0.07, 180, 360, hat)
        if side:
            f.poly([(hx, 0.065), (hx + 0.1, 0.065), (hx + 0.1, 0.078), (hx, 0.078)], hat)
        elif view == "front":
            f.ellipse(hx, 0.07, 0.07, 0.012, hat)
    if p.glasses and view != "back":
        g = (20, 20, 24)
        if side:
            f.limb((hx + 0.02, 0.078), (hx + 0.048, 0.078), 0.014, g)
        else:
            f.limb((-0.034, 0.078), (-0.012, 0.078), 0.014, g)
            f.limb((0.012, 0.078), (0.034, 0.078), 0.014, g)

    # Bags on top of everything.
    if p.bag_type == "backpack":
        if view == "back":
            f.poly([(-0.085, sh_y + 0.02), (0.085, sh_y + 0.02), (0.08, 0.42), (-0.08, 0.42)], bag)
        elif view == "front":
            for x in (-0.07, 0.07):
                f.limb((x, sh_y), (x * 1.05, 0.36), 0.022, bag)
        else:
            f.limb((-0.02, sh_y), (0.0, 0.33), 0.02, bag)
    elif p.bag_type == "handbag":
        hxx, hyy = hands[-1]
        f.poly([(hxx - 0.05, hyy), (hxx + 0.05, hyy), (hxx + 0.055, hyy + 0.085), (hxx - 0.055, hyy + 0.085)], bag)
    elif p.bag_type == "shoulder":
        if side:
            f.limb((0.0, sh_y), (-0.02, 0.44), 0.018, bag)
            f.poly([(-0.08, 0.42), (0.05, 0.42), (0.05, 0.53), (-0.08, 0.53)], bag)
        else:
            sgn = 1.0 if view == "front" else -1.0
            f.limb((-sgn * (tw - 0.03), sh_y), (sgn * (ww + 0.02), 0.45), 0.02, bag)
            x0 = sgn * (ww + 0.02)
            f.poly([(x0 - 0.05, 0.43), (x0 + 0.05, 0.43), (x0 + 0.05, 0.54), (x0 - 0.05, 0.54)], bag)


def _render(p: Identity, rng: random.Random, size: tuple[int, int]) -> np.ndarray:
    """One (H, W, 3) uint8 image of ``p`` under a random view, pose, framing, background and lighting."""
    h, w = size
    W, H = w * _SS, h * _SS
    canvas = _background(rng, W, H)
    view = rng.choices(("front", "back", "side"), weights=(0.4, 0.3, 0.3))[0]
    scale = rng.uniform(0.8, 0.95)  # person height / image height
    ph = scale * H
    top = rng.uniform(0.015, max(0.015, 0.99 - scale)) * H
    cx = W / 2 + rng.uniform(-0.1, 0.1) * W
    _draw_person(ImageDraw.Draw(canvas), p, view, rng, cx, top, ph)
    if rng.random() < 0.5:
        canvas = canvas.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    img = canvas.resize((w, h), Image.Resampling.BOX)

    # Lighting: contrast about the image mean, global brightness, a slight colour cast, sensor noise.
    arr = np.asarray(img, dtype=np.float32)
    contrast, brightness = rng.uniform(0.8, 1.15), rng.uniform(0.8, 1.2)
    cast = np.array([rng.uniform(0.93, 1.07) for _ in range(3)], np.float32)
    noise_rng = np.random.default_rng(rng.getrandbits(63))
    arr = (arr - arr.mean()) * contrast + arr.mean()
    arr = arr * (brightness * cast) + noise_rng.normal(0.0, rng.uniform(1.5, 5.0), arr.shape).astype(np.float32)
    return np.clip(np.rint(arr), 0, 255).astype(np.uint8)


# ----------------------------------------------------------------------------- the dataset


def _split_counts(n: int, fractions: tuple[float, float, float]) -> tuple[int, int, int]:
    """Identities per split by largest remainder, with at least one in every split given a share."""
    raw = [n * f for f in fractions]
    counts = [int(math.floor(r)) for r in raw]
    for i in sorted(range(3), key=lambda i: (counts[i] - raw[i], i))[: n - sum(counts)]:
        counts[i] += 1
    for i in range(3):  # tiny datasets: steal from the largest split so no requested split is empty
        if fractions[i] > 0 and counts[i] == 0:
            j = max(range(3), key=lambda j: counts[j])
            if counts[j] > 1:
                counts[j] -= 1
                counts[i] += 1
    return counts[0], counts[1], counts[2]


def check_synth_pedes_args(num_identities: int, images_per_identity: tuple[int, int], image_size: tuple[int, int],
                           split_identities: tuple[float, float, float],
                           disjoint_from: tuple[int, int] | None = None) -> None:
    """Refuse arguments :func:`make_synth_pedes` cannot generate from (the recipe's ``data.synth`` calls it too)."""
    if num_identities < 1:
        raise ValueError(f"num_identities must be >= 1, got {num_identities}")
    if disjoint_from is not None and int(disjoint_from[0]) < 1:
        raise ValueError(f"disjoint_from must be (num_identities >= 1, seed) of the set to leave out, got {disjoint_from}")
    lo, hi = images_per_identity
    if not 1 <= lo <= hi:
        raise ValueError(f"images_per_identity must be (min, max) with 1 <= min <= max, got {images_per_identity}")
    if min(image_size) < 16:
        raise ValueError(f"image_size (height, width) must be at least 16 pixels each, got {image_size}")
    if len(split_identities) != 3 or min(split_identities) < 0 or abs(sum(split_identities) - 1.0) > 1e-6:
        raise ValueError(f"split_identities must be three non-negative fractions (train, val, test) summing to 1, "
                         f"got {split_identities}")
    if split_identities[0] <= 0:
        raise ValueError("split_identities must give the train split a positive share")


def _check_cache(out: pathlib.Path, meta: dict[str, Any]) -> bool:
    """True when ``out`` already holds this exact dataset; raises when it holds a different one."""
    if not (out / ANNOTATION_FILE).exists():
        return False  # nothing there, or an interrupted run (the annotation file is written last)
    meta_path = out / META_FILE
    if not meta_path.exists():
        raise ValueError(f"{out} already holds a {ANNOTATION_FILE} that make_synth_pedes did not write "
                         f"(no {META_FILE}); pass overwrite=True (--overwrite) to replace it")
    old = json.loads(meta_path.read_text())
    differ = [f"{k}: on disk {old.get(k)!r}, requested {meta.get(k)!r}"
              for k in dict.fromkeys([*meta, *old]) if old.get(k) != meta.get(k)]
    if differ:
        raise ValueError(f"{out} holds SynthPEDES generated with other arguments ({'; '.join(differ)}); "
                         f"pass overwrite=True (--overwrite) to regenerate it, or use another directory")
    return True


def make_synth_pedes(out_dir: str | os.PathLike, *, num_identities: int = 400,
                     images_per_identity: tuple[int, int] = (3, 5),
                     image_size: tuple[int, int] = (96, 48),
                     split_identities: tuple[float, float, float] = (0.7, 0.15, 0.15),
                     seed: int = 0, disjoint_from: tuple[int, int] | None = None,
                     overwrite: bool = False) -> pathlib.Path:
    """Write SynthPEDES in the CUHK-PEDES layout under ``out_dir`` and return ``out_dir``.

    Writes ``imgs/synth/<pid>_<k>.png`` (``image_size`` is (H, W)), ``reid_raw.json`` (one
    record per image: split, 2 captions, file_path relative to ``imgs/``, processed_tokens,
    1-based id; train ids first, then val, then test) and ``synth_meta.json`` (the arguments).
    Splits are by identity with ``split_identities`` as (train, val, test) fractions.

    ``disjoint_from=(n, s)`` keeps out every person of the SynthPEDES that ``num_identities=n,
    seed=s`` draws (same described attributes): a pre-training corpus that shares no person with
    the target set, so a teacher pre-trained on it has seen none of the target's test people.

    If ``out_dir`` already has a ``reid_raw.json``: with matching ``synth_meta.json`` it is
    returned as is (nothing is redrawn); otherwise a ValueError names the differing
    arguments, unless ``overwrite`` is set, which regenerates it.
    """
    images_per_identity = (int(images_per_identity[0]), int(images_per_identity[1]))
    image_size = (int(image_size[0]), int(image_size[1]))
    split_identities = tuple(float(x) for x in split_identities)  # type: ignore[assignment]
    check_synth_pedes_args(num_identities, images_per_identity, image_size, split_identities, disjoint_from)
    out = pathlib.Path(out_dir)
    # Lists, as JSON stores them, so a round-tripped meta compares equal to a fresh one.
    meta = {"num_identities": int(num_identities), "images_per_identity": list(images_per_identity),
            "image_size": list(image_size), "split_identities": list(split_identities), "seed": int(seed),
            "generator_version": GENERATOR_VERSION}
    exclude: frozenset[tuple[Any, ...]] = frozenset()
    if disjoint_from is not None:  # recorded only when given, so sets written before it still match
        other_n, other_seed = int(disjoint_from[0]), int(disjoint_from[1])
        meta["disjoint_from"] = [other_n, other_seed]
        exclude = frozenset(p.key() for p in sample_identities(other_n, other_seed))
    if not overwrite and _check_cache(out, meta):
        return out

    img_root = out / "imgs" / IMAGE_SUBDIR
    (out / ANNOTATION_FILE).unlink(missing_ok=True)  # from here until the end the directory counts as incomplete
    if img_root.exists():
        shutil.rmtree(img_root)  # only our own subfolder: stale images of a larger run must not linger
    img_root.mkdir(parents=True)

    identities = sample_identities(num_identities, seed, exclude)
    n_train, n_val, _ = _split_counts(num_identities, split_identities)
    width = max(4, len(str(num_identities)))
    count_rng = random.Random(f"synthpedes:{seed}:counts")
    records: list[dict[str, Any]] = []
    for i, person in enumerate(identities):
        pid = i + 1
        split = "train" if i < n_train else "val" if i < n_train + n_val else "test"
        for k in range(count_rng.randint(*images_per_identity)):
            rel = f"{IMAGE_SUBDIR}/{pid:0{width}d}_{k:02d}.png"
            pixels = _render(person, random.Random(f"synthpedes:{seed}:image:{pid}:{k}"), image_size)
            Image.fromarray(pixels, "RGB").save(out / "imgs" / rel, compress_level=1)
            cap_rng = random.Random(f"synthpedes:{seed}:captions:{pid}:{k}")
            captions = [_caption(person, cap_rng, partial=cap_rng.random() < 0.15),
                        _caption(person, cap_rng, partial=cap_rng.random() < 0.4)]
            records.append({"split": split, "captions": captions, "file_path": rel,
                            "processed_tokens": [_tokens(c) for c in captions], "id": pid})

    (out / META_FILE).write_text(json.dumps(meta, indent=2) + "\n")
    # The annotation file marks a finished dataset, so it is written last and atomically.
    tmp = out / (ANNOTATION_FILE + ".tmp")
    tmp.write_text(json.dumps(records))
    os.replace(tmp, out / ANNOTATION_FILE)
    return out
