"""What every format reader hands to the loading rules: a checkpoint read and renamed to open_clip keys.

A format module (:mod:`.irra`, :mod:`.openai`, :mod:`.tinyclip`, :mod:`.openclip`, :mod:`.hf_clip`,
:mod:`.run_folder`) turns its files into a :class:`Source`; :mod:`.rules` then loads any
:class:`Source` the same way. Everything a format knows about the model its weights belong to is
data here (its architecture, image size, patch stride, the tensors it lacks), so the rules never
ask which format they are looking at.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from kd_trainer.models.loading.errors import CheckpointError

PathLike = str | os.PathLike

KD_TRAINER = "kd_trainer"  # the one format whose keys are already ours (``clip.``-prefixed)


@dataclass(frozen=True)
class Fill:
    """A model tensor the checkpoint lacks by design, set to ``value`` everywhere; ``rule`` says why."""

    value: float
    rule: str


@dataclass
class Source:
    """A checkpoint read and renamed to open_clip ``CLIP`` keys (kd_trainer keys for ``kd_trainer``)."""

    format: str
    path: Path
    tensors: dict[str, torch.Tensor]
    dropped: dict[str, str] = field(default_factory=dict)  # source key -> rule that dropped it
    visual_grid: tuple[int, int] | None = None  # the (H, W) grid of visual.positional_embedding, if known
    notes: list[str] = field(default_factory=list)
    # The model the checkpoint was trained as, as far as its files say:
    arch: str | dict[str, Any] | None = None  # a name or an open_clip-style dict; None: give one
    arch_name: str | None = None  # the name to give the model when ``arch`` is the dict of a named one
    image_size: tuple[int, int] | None = None
    context_length: int | None = None
    stride_size: int | None = None  # a patch stride other than the patch size (IRRA's overlapping patches)
    projection_dim: int | None = None  # training-only projections' width (kd_trainer students)
    fills: dict[str, Fill] = field(default_factory=dict)  # model key (``clip.``-prefixed) -> its fill

    @property
    def model_keys(self) -> dict[str, torch.Tensor]:
        """The tensors under the model's own names (``clip.`` before open_clip's)."""
        if self.format == KD_TRAINER:
            return dict(self.tensors)
        return {f"clip.{k}": v for k, v in self.tensors.items()}


def strip_prefix(sd: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    """DDP saves every key under ``module.``; strip it only when all keys have it."""
    if sd and all(k.startswith(prefix) for k in sd):
        return {k[len(prefix):]: v for k, v in sd.items()}
    return sd


def first_file(folder: Path, names: tuple[str, ...], what: str) -> Path:
    """The first of ``names`` present in ``folder``, which is ``what`` (for the error)."""
    for name in names:
        if (folder / name).is_file():
            return folder / name
    raise CheckpointError(f"No weights in {str(folder)!r}, {what}: expected one of {list(names)}.")


def count_blocks(tensors: dict[str, torch.Tensor], prefix: str) -> int:
    """How many transformer blocks the keys under ``prefix`` (``...resblocks.``) number."""
    return len({k[len(prefix):].split(".")[0] for k in tensors if k.startswith(prefix)})
