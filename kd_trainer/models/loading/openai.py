"""OpenAI's CLIP releases: TorchScript archives (``ViT-B-16.pt``) and the state dicts taken from them.

The keys are open_clip's own (open_clip copied OpenAI's module names), so the only rule is for
three scalars TorchScript archives carry (``input_resolution``, ``context_length``,
``vocab_size``): they are the model's config, not weights, and are dropped. The archive itself is
read by :func:`kd_trainer.models.loading.files.read_file` (``torch.jit.load``, no code run from the
file beyond TorchScript's own).
"""

from __future__ import annotations

from pathlib import Path

import torch

from kd_trainer.models.loading.source import Source

OPENAI_JIT = "openai_jit"
OPENAI_JIT_METADATA = ("input_resolution", "context_length", "vocab_size")
RULE_JIT_METADATA = "OpenAI TorchScript metadata (the model's own config holds these)"


def drop_jit_metadata(sd: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """OpenAI's TorchScript state dicts carry three scalars that are config, not weights."""
    dropped = {k: RULE_JIT_METADATA for k in OPENAI_JIT_METADATA if k in sd and sd[k].ndim == 0}
    return {k: v for k, v in sd.items() if k not in dropped}, dropped


def openai_jit_source(sd: dict[str, torch.Tensor], path: Path) -> Source:
    """A TorchScript archive's state dict, its metadata scalars dropped."""
    return Source(OPENAI_JIT, path, *drop_jit_metadata(sd))
