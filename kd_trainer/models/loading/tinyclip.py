"""TinyCLIP's release files: open_clip's modules under TinyCLIP's wrappers.

``_image_encoder.visual.*`` holds ``visual.*``, ``_text_encoder.*`` the text tower's top-level keys,
``_logit_scale.logit_scale`` the scale, with DDP's ``.module`` after those prefixes (or ``module.``
before them, stripped by :mod:`.detect`). TinyCLIP's files with plain open_clip key names
(``tinyclip_yfcc15m_xsmall.pth``) are :mod:`.openclip`'s format instead.
"""

from __future__ import annotations

import re
from pathlib import Path

import torch

from kd_trainer.models.loading.source import Source

TINYCLIP = "tinyclip"
TINYCLIP_PREFIXES = ("_image_encoder.", "_text_encoder.", "_logit_scale.")

_TINYCLIP_KEY = re.compile(r"^_(?:image_encoder|text_encoder|logit_scale)\.(?:module\.)?(.+)$")


def tinyclip_keys(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """TinyCLIP's keys under open_clip's names. Keys outside the three wrappers pass through, to be
    reported as unexpected (e.g. ``l0_module`` pruning masks, which change the forward pass)."""
    out = {}
    for k, v in sd.items():
        m = _TINYCLIP_KEY.match(k)
        out[m.group(1) if m else k] = v
    return out


def tinyclip_source(sd: dict[str, torch.Tensor], path: Path) -> Source:
    """A TinyCLIP release state dict, renamed to open_clip's keys."""
    return Source(TINYCLIP, path, tinyclip_keys(sd))
