"""Named CLIP architectures (JSON files in ``configs/``) and the one factory that builds them.

Architectures are data, as in open_clip: one small JSON per name, in open_clip's
``CLIP(embed_dim, vision_cfg, text_cfg, quick_gelu)`` layout, plus a default
``image_size`` as ``[height, width]`` (person crops are tall, so never square by default).
"""

from __future__ import annotations

import contextlib
import copy
import difflib
import json
from pathlib import Path
from typing import Any, Collection

import open_clip
import torch
from torch import nn

CONFIG_DIR = Path(__file__).parent / "configs"


def list_architectures() -> list[str]:
    """Names accepted by :func:`get_architecture`, sorted."""
    return sorted(p.stem for p in CONFIG_DIR.glob("*.json"))


def get_architecture(arch: str | dict[str, Any]) -> dict[str, Any]:
    """The architecture dict for a name (or a copy of a dict already in that layout)."""
    if isinstance(arch, dict):
        cfg = copy.deepcopy(arch)
    else:
        path = CONFIG_DIR / f"{arch}.json"
        if not path.is_file():
            valid = list_architectures()
            close = difflib.get_close_matches(str(arch), valid, n=1)
            hint = f" Did you mean {close[0]!r}?" if close else ""
            raise ValueError(f"Unknown architecture {arch!r}.{hint} Valid names: {', '.join(valid)}.")
        cfg = json.loads(path.read_text())
    missing = [k for k in ("embed_dim", "vision_cfg", "text_cfg") if k not in cfg]
    if missing:
        raise ValueError(f"Architecture {arch!r} lacks required keys {missing}; expected open_clip's layout "
                         "{embed_dim, vision_cfg, text_cfg[, quick_gelu, image_size]}.")
    cfg.pop("_doc", None)
    return cfg


def _hw(size: int | tuple[int, int] | list[int]) -> tuple[int, int]:
    if isinstance(size, int):
        return (size, size)
    h, w = size
    return (int(h), int(w))


def create_clip(
    arch: str | dict[str, Any],
    *,
    image_size: int | tuple[int, int] | None = None,
    context_length: int | None = None,
) -> open_clip.CLIP:
    """Build a randomly initialised open_clip ``CLIP`` for a named architecture.

    ``image_size`` is ``(height, width)``; the visual position grid is ``(H/patch, W/patch)``.
    """
    cfg = get_architecture(arch)
    default_size = cfg.pop("image_size", 224)  # ours, not an open_clip CLIP argument
    size = _hw(image_size if image_size is not None else default_size)
    patch = _hw(cfg["vision_cfg"].get("patch_size", 16))
    if size[0] % patch[0] or size[1] % patch[1]:
        raise ValueError(f"image_size {size} (H, W) is not divisible by the patch size {patch} of {arch!r}; "
                         "choose a size that is a multiple of the patch size.")
    cfg["vision_cfg"] = {**cfg["vision_cfg"], "image_size": size}
    if context_length is not None:
        cfg["text_cfg"] = {**cfg["text_cfg"], "context_length": int(context_length)}
    quick_gelu = bool(cfg.pop("quick_gelu", False))
    return open_clip.CLIP(**cfg, quick_gelu=quick_gelu)


class RetrievalModel(nn.Module):
    """A CLIP dual encoder as the Trainer sees it: both towers, plus optional projections.

    ``forward`` returns raw (unnormalised) embeddings; every loss term normalises its
    inputs, and evaluation normalises too. When the student's embedding width differs
    from the teacher's, ``image_proj``/``text_proj`` map student embeddings into the
    teacher's space for the terms that compare the two directly; they are trained and
    saved with the student, and are not part of the deployable dual encoder.
    """

    def __init__(self, clip: open_clip.CLIP, *, arch: str | dict | None = None, projection_dim: int | None = None):
        super().__init__()
        self.clip = clip
        self.arch = arch
        dim = self.embed_dim
        if projection_dim is not None and projection_dim != dim:
            self.image_proj: nn.Module | None = nn.Linear(dim, projection_dim)
            self.text_proj: nn.Module | None = nn.Linear(dim, projection_dim)
        else:
            self.image_proj = self.text_proj = None

    @property
    def embed_dim(self) -> int:
        return int(self.clip.text_projection.shape[1])

    @property
    def image_size(self) -> tuple[int, int]:
        return tuple(self.clip.visual.image_size)  # type: ignore[return-value]

    @property
    def context_length(self) -> int:
        return int(self.clip.context_length)

    def encode_image(self, pixel_values: torch.Tensor, normalize: bool = True) -> torch.Tensor:
        return self.clip.encode_image(pixel_values, normalize=normalize)

    def encode_text(self, input_ids: torch.Tensor, normalize: bool = True) -> torch.Tensor:
        return self.clip.encode_text(input_ids, normalize=normalize)

    def forward(
        self,
        pixel_values: torch.Tensor | None = None,
        input_ids: torch.Tensor | None = None,
        no_grad: Collection[str] = (),
    ) -> dict[str, torch.Tensor]:
        """Embed whichever inputs are given. Towers named in ``no_grad`` (``image``/``text``) run
        without autograd: a frozen tower of a staged run builds no graph and gets no gradient."""
        out: dict[str, torch.Tensor] = {}
        if pixel_values is not None:
            with torch.no_grad() if "image" in no_grad else contextlib.nullcontext():
                out["image_embeds"] = self.clip.encode_image(pixel_values)
                if self.image_proj is not None:
                    out["image_embeds_proj"] = self.image_proj(out["image_embeds"])
        if input_ids is not None:
            with torch.no_grad() if "text" in no_grad else contextlib.nullcontext():
                out["text_embeds"] = self.clip.encode_text(input_ids)
                if self.text_proj is not None:
                    out["text_embeds_proj"] = self.text_proj(out["text_embeds"])
        return out


def create_model(
    arch: str | dict[str, Any],
    *,
    image_size: int | tuple[int, int] | None = None,
    context_length: int | None = None,
    projection_dim: int | None = None,
) -> RetrievalModel:
    """A :class:`RetrievalModel` for a named architecture, randomly initialised."""
    clip = create_clip(arch, image_size=image_size, context_length=context_length)
    return RetrievalModel(clip, arch=arch, projection_dim=projection_dim)
