"""How each PIL image mode becomes the 8-bit RGB image the models see.

``Image.convert("RGB")`` is right for most modes but silently wrong for some that image files
do hold: a 16-bit grayscale PNG (``I;16``) is *clipped* to 8 bits, so every pixel above 255 of
65535 (almost all of them) comes out white; a float image (``F``) in [0, 1] comes out black;
a transparent pixel keeps whatever colour the file stored under it. :func:`to_rgb` decides each
mode once, deliberately:

- ``RGB``, ``L``, ``1``, ``P``, ``CMYK``, ``YCbCr``, ``HSV``, ``RGBX``: PIL's conversion
  (``1``: black and white; ``P``: the palette's colours);
- alpha (``RGBA``, ``LA``, ``PA``, ``RGBa``, and ``P``/``L``/``RGB`` with a transparent
  colour): composited onto white, which is how image viewers show a transparent image, so the
  model sees what the person writing the caption saw;
- ``I;16`` (any byte order): scaled from the full 16-bit range, ``v * 255 / 65535``; not
  stretched to the image's own min/max, which would change each image's brightness;
- ``I`` (32-bit integers; the bit depth is not in the mode): 0..255 is taken as 8-bit data and
  kept, 256..65535 as 16-bit data and scaled as ``I;16``; values outside 0..65535 are refused;
- ``F`` (32-bit floats): [0, 1] is scaled by 255, [0, 255] kept; other values (negative, above
  255, NaN) are refused: they are measurements (depth, heat), not a photograph.

Any other mode (``LAB``, which PIL cannot convert without a colour profile, ``I;32``, ...) is
refused with :class:`UnsupportedImageMode`, naming the mode and what is accepted.
"""

from __future__ import annotations

import numpy as np
from PIL import Image

__all__ = ["SUPPORTED_MODES", "UnsupportedImageMode", "to_rgb"]

_PIL_CONVERTS = ("RGB", "L", "1", "P", "CMYK", "YCbCr", "HSV", "RGBX")
_ALPHA = ("RGBA", "LA", "PA", "RGBa")
_SIXTEEN_BIT = ("I;16", "I;16L", "I;16B", "I;16N")
SUPPORTED_MODES = (*_PIL_CONVERTS, *_ALPHA, *_SIXTEEN_BIT, "I", "F")

_WHITE = (255, 255, 255, 255)


class UnsupportedImageMode(ValueError):
    """An image whose pixel values have no one right reading as an 8-bit RGB photograph."""


def _gray(values: np.ndarray) -> Image.Image:
    """8-bit values (already in 0..255) as an RGB image."""
    return Image.fromarray(np.rint(values).clip(0, 255).astype(np.uint8)).convert("RGB")  # 2-D uint8: mode L


def _integers(image: Image.Image) -> Image.Image:
    values = np.asarray(image, dtype=np.int64)
    low, high = (int(values.min()), int(values.max())) if values.size else (0, 0)
    if image.mode in _SIXTEEN_BIT or high > 255:
        if low < 0 or high > 65535:
            raise UnsupportedImageMode(
                f"a 32-bit integer image (mode I) with values {low}..{high}; expected 8-bit (0..255) or 16-bit "
                f"(0..65535) grayscale")
        return _gray(values * (255 / 65535))
    if low < 0:
        raise UnsupportedImageMode(f"a 32-bit integer image (mode I) with negative values ({low}..{high}); "
                                   f"expected 8-bit (0..255) or 16-bit (0..65535) grayscale")
    return _gray(values)


def _floats(image: Image.Image) -> Image.Image:
    values = np.asarray(image, dtype=np.float64)
    finite = bool(np.isfinite(values).all())
    low, high = (float(values.min()), float(values.max())) if values.size and finite else (0.0, 0.0)
    if not finite or low < 0 or high > 255:
        shown = "non-finite values" if not finite else f"values {low:g}..{high:g}"
        raise UnsupportedImageMode(f"a float image (mode F) with {shown}; expected values in [0, 1] or [0, 255]")
    return _gray(values * 255 if high <= 1 else values)


def to_rgb(image: Image.Image) -> Image.Image:
    """``image`` as 8-bit RGB, each mode read as the module docstring says (decodes the image).

    Raises :class:`UnsupportedImageMode` (a ValueError) for a mode or value range with no one right
    reading; the message says what the image holds and what is expected, without naming a file.
    """
    mode = image.mode
    if mode in _ALPHA or (mode in ("P", "L", "RGB") and "transparency" in image.info):
        rgba = image.convert("RGBA")
        return Image.alpha_composite(Image.new("RGBA", rgba.size, _WHITE), rgba).convert("RGB")
    if mode in _PIL_CONVERTS:
        return image.convert("RGB")
    if mode in _SIXTEEN_BIT or mode == "I":
        return _integers(image)
    if mode == "F":
        return _floats(image)
    raise UnsupportedImageMode(f"an image of PIL mode {mode!r}, which has no one right reading as RGB; expected "
                               f"one of the modes {', '.join(SUPPORTED_MODES)} (convert it to RGB first)")
