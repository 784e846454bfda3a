"""open_clip's own checkpoints: state dicts with its key names, and ``save_pretrained`` folders.

- A state dict (``visual.conv1.weight``, ``transformer.resblocks.N...``, ``token_embedding.weight``,
  ``logit_scale``), plain or nested under ``state_dict``/``model``, with or without DDP's
  ``module.`` prefix (an open_clip training checkpoint ``epoch_N.pt``). It does not say its
  architecture. TinyCLIP's ``tinyclip_yfcc15m_xsmall.pth`` is this format.
- A folder with ``open_clip_config.json`` and ``open_clip_model.safetensors`` (or
  ``open_clip_pytorch_model.bin``), the layout kd_trainer exports: the config declares the
  architecture and the image size.

Only ViT + text-transformer CLIPs are supported (the dual encoder kd_trainer builds).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from kd_trainer.models.loading.errors import CheckpointError
from kd_trainer.models.loading.files import read_file
from kd_trainer.models.loading.openai import drop_jit_metadata
from kd_trainer.models.loading.source import Source, first_file, strip_prefix

OPEN_CLIP = "open_clip"
OPEN_CLIP_FOLDER = "open_clip_folder"
OPEN_CLIP_CONFIG_NAME = "open_clip_config.json"
OPEN_CLIP_WEIGHT_FILES = ("open_clip_model.safetensors", "open_clip_pytorch_model.bin")

_OPEN_CLIP_KEYS = {"embed_dim", "vision_cfg", "text_cfg", "quick_gelu", "init_logit_scale", "init_logit_bias"}


def open_clip_source(sd: dict[str, torch.Tensor], path: Path) -> Source:
    """A state dict with open_clip's key names (OpenAI's metadata scalars dropped, if a copy kept them)."""
    return Source(OPEN_CLIP, path, *drop_jit_metadata(sd))


def open_clip_architecture(model_cfg: dict[str, Any]) -> dict[str, Any]:
    """Our architecture dict for an open_clip ``model_cfg``; only ViT + text-transformer CLIPs (the dual
    encoder kd_trainer builds), not timm/HF towers or CustomTextCLIP."""
    extra = sorted(k for k, v in model_cfg.items() if k not in _OPEN_CLIP_KEYS and v)
    vision, text = model_cfg.get("vision_cfg", {}), model_cfg.get("text_cfg", {})
    if extra or vision.get("timm_model_name") or text.get("hf_model_name") or isinstance(vision.get("layers"), list):
        raise CheckpointError(f"Unsupported open_clip model config (keys {extra}, vision {sorted(vision)}, text "
                              f"{sorted(text)}): only ViT + text-transformer CLIP models are supported.")
    arch = {k: v for k, v in model_cfg.items() if k in _OPEN_CLIP_KEYS}
    size = vision.get("image_size", 224)
    arch["image_size"] = [size, size] if isinstance(size, int) else list(size)
    return arch


def read_open_clip_folder(folder: Path, trusted: bool = False) -> Source:
    """open_clip's ``save_pretrained`` layout: the config declares the architecture and image size."""
    try:
        cfg = json.loads((folder / OPEN_CLIP_CONFIG_NAME).read_text())
    except ValueError as e:
        raise CheckpointError(f"Cannot parse {str(folder / OPEN_CLIP_CONFIG_NAME)!r}: {e}") from e
    arch = open_clip_architecture(cfg.get("model_cfg", cfg))
    file = first_file(folder, OPEN_CLIP_WEIGHT_FILES, "an open_clip folder")
    tensors, dropped = drop_jit_metadata(strip_prefix(read_file(file, trusted=trusted), "module."))
    patch = arch["vision_cfg"].get("patch_size", 16)
    grid = (arch["image_size"][0] // patch, arch["image_size"][1] // patch)
    return Source(OPEN_CLIP_FOLDER, folder, tensors, dropped, visual_grid=grid, arch=arch)
