"""Opening dataset images, and finding the ones that cannot be opened before training reads them.

:func:`open_image` is what training, evaluation and the teacher cache call for every image.
:func:`find_unreadable` runs that same function over many files on a thread pool (PIL
releases the GIL while it decodes), so "it passed the check" means "training can read it".

Each unreadable file gets a *kind*, so a report can say what went wrong, not only how often:

- ``missing``: no such file;
- ``empty``: a zero-byte file (an interrupted copy or download);
- ``not an image``: bytes PIL does not recognise as any image format (random bytes, HTML
  error pages saved under an image name, a header followed by garbage);
- ``truncated``: a recognised image whose data ends early;
- ``unsupported``: decoded, but its pixels have no one right reading as RGB (a float image of
  depths, a LAB image; see :mod:`.modes`, which decides how every mode becomes RGB);
- ``corrupt``: any other decode failure.
"""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Sequence

from PIL import Image, UnidentifiedImageError

from kd_trainer.data.errors import DatasetFormatError
from kd_trainer.data.modes import UnsupportedImageMode, to_rgb

__all__ = ["TINY_SIDE", "UNREADABLE_KINDS", "ImageScan", "find_unreadable", "open_image", "scan_images", "unreadable_kind"]

UNREADABLE_KINDS = ("missing", "empty", "not an image", "truncated", "unsupported", "corrupt")

# An image that fails while training reads it was not decoded at load: say which recipe keys
# would have found it (or dropped it) before training started.
_TRAIN_HINT = ("set data.verify_images: true to find every such image before training, "
               "and data.skip_unreadable: true to drop them (the count is reported)")


def _one_line(text: object) -> str:
    return " ".join(str(text).split())


def unreadable_kind(path: str | os.PathLike, error: BaseException) -> str:
    """Which of :data:`UNREADABLE_KINDS` ``error`` (raised opening ``path``) is."""
    if isinstance(error, FileNotFoundError):
        return "missing"
    if isinstance(error, UnsupportedImageMode):
        return "unsupported"
    try:
        if os.path.getsize(path) == 0:
            return "empty"
    except OSError:
        return "missing"  # vanished between the open and the stat
    if isinstance(error, UnidentifiedImageError):
        return "not an image"
    if "truncated" in str(error).lower():  # PIL: "image file is truncated", "Truncated File Read"
        return "truncated"
    return "corrupt"


def open_image(path: str | os.PathLike, dataset_name: str = "") -> Image.Image:
    """Decode an image fully and return it as 8-bit RGB, each PIL mode read as :func:`.modes.to_rgb` decides.

    A failure is a one-line :class:`DatasetFormatError` naming the dataset, the file and
    the kind of problem, and the recipe keys that find or drop such images before training:
    one line because it may travel through a DataLoader worker (see ``errors.py``).
    """
    who = f"{dataset_name}: " if dataset_name else ""
    try:
        with Image.open(path) as im:
            return to_rgb(im)  # converting forces the full decode, so truncation shows here
    except FileNotFoundError:
        raise DatasetFormatError(
            f"{who}image file {os.fspath(path)} is missing; expected the file named by the annotation "
            f"record, under the dataset's imgs/ folder; {_TRAIN_HINT}"
        ) from None
    except UnsupportedImageMode as e:
        raise DatasetFormatError(
            f"{who}cannot use image {os.fspath(path)} (unsupported: {e}); {_TRAIN_HINT}") from e
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as e:
        kind = unreadable_kind(path, e)
        raise DatasetFormatError(
            f"{who}cannot decode image {os.fspath(path)} ({kind}: {type(e).__name__}: {_one_line(e)}); "
            f"expected an image file PIL can read (JPEG/PNG); {_TRAIN_HINT}"
        ) from e


# A side this short holds no person: a 1x1 placeholder resized to 384x128 is one flat colour.
TINY_SIDE = 4


@dataclass(frozen=True)
class ImageScan:
    """What decoding a list of images found, by position in the list."""

    unreadable: dict[int, tuple[str, str]]  # (kind, detail) of each image open_image refuses
    tiny: dict[int, tuple[int, int]]  # (width, height) of each readable image with a side below TINY_SIDE


def _inspect(path: str) -> tuple[str, str] | tuple[int, int]:
    """(kind, detail) if ``open_image`` fails on ``path``, else the image's (width, height)."""
    try:
        return open_image(path).size
    except DatasetFormatError as e:
        cause = e.__cause__
        if cause is None:
            return "missing", "no such file"
        return unreadable_kind(path, cause), f"{type(cause).__name__}: {_one_line(cause)}"


def scan_images(paths: Sequence[str], *, max_workers: int | None = None) -> ImageScan:
    """Decode every file in ``paths`` in parallel, as training reads them: the unreadable and the tiny ones."""
    if not paths:
        return ImageScan({}, {})
    workers = max_workers or min(32, (os.cpu_count() or 1) + 4)
    with ThreadPoolExecutor(max_workers=workers) as pool:
        results = list(pool.map(_inspect, paths))
    return ImageScan({i: r for i, r in enumerate(results) if isinstance(r[0], str)},  # type: ignore[misc]
                     {i: r for i, r in enumerate(results) if isinstance(r[0], int) and min(r) < TINY_SIDE})  # type: ignore[misc]


def find_unreadable(paths: Sequence[str], *, max_workers: int | None = None) -> dict[int, tuple[str, str]]:
    """Decode every file in ``paths`` in parallel: ``{position in paths: (kind, detail)}`` for each failure."""
    return scan_images(paths, max_workers=max_workers).unreadable
