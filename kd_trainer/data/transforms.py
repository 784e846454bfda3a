"""IRRA's image transforms for person images (tall crops, 384x128 by default).

Written out here rather than taken from open_clip, whose default transforms resize the
short side and centre-crop a square: that cuts the head and feet off a pedestrian.

- train, augment (IRRA ``--img_aug``): Resize((H, W)), RandomHorizontalFlip(0.5), Pad(10),
  RandomCrop((H, W)), ToTensor, Normalize, RandomErasing(scale=(0.02, 0.4), value=mean)
- train, no augment: Resize, RandomHorizontalFlip(0.5), ToTensor, Normalize
- evaluation: Resize, ToTensor, Normalize

Resize uses torchvision's default (bilinear, antialiased) because IRRA calls
``T.Resize((h, w))`` without an interpolation argument. RandomErasing runs after
Normalize with ``value=mean``, as in IRRA, so erased pixels hold the numbers of the CLIP
mean in normalised units (not the mean colour); kept as is to reproduce IRRA.
"""

from __future__ import annotations

import hashlib
import random
from typing import Callable

import torch
from PIL import Image
from torchvision import transforms as T

from kd_trainer.data.modes import to_rgb

__all__ = ["CLIP_MEAN", "CLIP_STD", "ToRGB", "build_image_transform", "run_seeded", "stable_seed"]

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


class ToRGB:
    """Convert any PIL mode (L, P, RGBA, CMYK, I;16 ...) to RGB by the one rule of :func:`.modes.to_rgb`
    (``convert("RGB")`` alone turns 16-bit grayscale white); a module-level class so it pickles."""

    def __call__(self, image: Image.Image) -> Image.Image:
        return image if image.mode == "RGB" and "transparency" not in image.info else to_rgb(image)

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"


def build_image_transform(
    image_size: tuple[int, int], *, train: bool, augment: bool = True
) -> Callable[[Image.Image], torch.Tensor]:
    """PIL image -> normalised float tensor ``3 x H x W``; ``image_size`` is ``(height, width)``.

    ``augment`` only matters when ``train`` is true.
    """
    if len(image_size) != 2 or min(image_size) <= 0:
        raise ValueError(f"image_size must be (height, width) with positive ints, got {image_size!r}")
    height, width = int(image_size[0]), int(image_size[1])
    steps: list[Callable] = [ToRGB(), T.Resize((height, width))]
    if train:
        steps.append(T.RandomHorizontalFlip(0.5))
        if augment:
            steps += [T.Pad(10), T.RandomCrop((height, width))]
    steps += [T.ToTensor(), T.Normalize(mean=CLIP_MEAN, std=CLIP_STD)]
    if train and augment:
        steps.append(T.RandomErasing(scale=(0.02, 0.4), value=list(CLIP_MEAN)))
    return T.Compose(steps)


def stable_seed(key: str) -> int:
    """A 63-bit seed from a string key, the same in every process and run.

    blake2b rather than ``hash()``: Python salts string hashes per process, and a seed must be
    the same in every DataLoader worker, in a resumed run and in a teacher-cache builder.
    """
    return int.from_bytes(hashlib.blake2b(key.encode(), digest_size=8).digest(), "little") & (2**63 - 1)


def run_seeded(transform: Callable[[Image.Image], torch.Tensor], image: Image.Image, seed: int) -> torch.Tensor:
    """``transform(image)`` with torch's CPU generator and Python's ``random`` seeded by ``seed``,
    both restored afterwards, so the caller's random streams are untouched.

    Not ``torch.manual_seed``: that would also reseed the CUDA generators (dropout on the GPU).
    """
    py_state = random.getstate()
    try:
        with torch.random.fork_rng(devices=[]):  # CPU generator only; saved and restored
            torch.default_generator.manual_seed(seed)
            random.seed(seed)
            return transform(image)
    finally:
        random.setstate(py_state)
