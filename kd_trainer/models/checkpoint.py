"""Reading weights into a :class:`RetrievalModel`, strictly.

The original research code printed mismatched keys and carried on; here every key is
accounted for. A checkpoint loads when its keys match the model exactly, up to rules we can
name (a training-only projection that the target has no use for). Anything else stops the
run with an error listing the missing and unexpected keys.
"""

from __future__ import annotations

import json
import logging
import os
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import safetensors.torch
import torch

from kd_trainer.models.factory import RetrievalModel, create_model

logger = logging.getLogger("kd_trainer")

WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")
MODEL_CONFIG_NAME = "kd_trainer_model.json"
_PROJECTION_PREFIXES = ("image_proj.", "text_proj.")


class CheckpointError(ValueError):
    """A checkpoint that cannot be loaded as asked; the message says what was found and expected."""


@dataclass
class LoadReport:
    source: str
    loaded: int = 0
    dropped: list[str] = field(default_factory=list)  # keys explained by a rule and not loaded

    def summary(self) -> str:
        s = f"loaded {self.loaded} tensors from {self.source}"
        if self.dropped:
            s += f"; dropped {len(self.dropped)} training-only projection tensors ({', '.join(self.dropped)})"
        return s


def _weights_file(path: Path) -> Path:
    if path.is_dir():
        for name in WEIGHT_FILES:
            if (path / name).is_file():
                return path / name
        raise CheckpointError(f"No weights in folder {str(path)!r}: expected one of {list(WEIGHT_FILES)} "
                              "(the output folder of a kd_trainer run, or a checkpoint-N folder inside it).")
    if not path.is_file():
        raise CheckpointError(f"Checkpoint {str(path)!r} does not exist.")
    return path


def read_state_dict(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Tensors of a checkpoint file or run folder (``.safetensors`` or a torch pickle,
    optionally nested under ``state_dict`` or ``model``)."""
    file = _weights_file(Path(path))
    try:
        if file.suffix == ".safetensors":
            sd: Any = safetensors.torch.load_file(str(file))
        else:
            sd = torch.load(str(file), map_location="cpu", weights_only=True)
    except (RuntimeError, OSError, EOFError, zipfile.BadZipFile, safetensors.SafetensorError) as e:
        raise CheckpointError(f"Cannot read checkpoint {str(file)!r} ({type(e).__name__}: {e}). "
                              "The file may be truncated or not a PyTorch/safetensors checkpoint.") from e
    for nest in ("state_dict", "model"):
        if isinstance(sd, dict) and isinstance(sd.get(nest), dict):
            sd = sd[nest]
    if not isinstance(sd, dict) or not all(isinstance(v, torch.Tensor) for v in sd.values()):
        raise CheckpointError(f"Checkpoint {str(file)!r} does not hold a state dict of tensors.")
    return sd


def load_weights(model: RetrievalModel, path: str | os.PathLike) -> LoadReport:
    """Load a checkpoint into ``model`` (a kd_trainer state dict, or open_clip/OpenAI CLIP keys)."""
    sd = read_state_dict(path)
    if not any(k.startswith("clip.") for k in sd):
        sd = {f"clip.{k}": v for k, v in sd.items()}  # plain open_clip / OpenAI CLIP key names
    expected = model.state_dict()
    report = LoadReport(source=str(path))
    for k in list(sd):
        if k.startswith(_PROJECTION_PREFIXES) and k not in expected:
            report.dropped.append(k)
            del sd[k]
    missing = sorted(set(expected) - set(sd))
    unexpected = sorted(set(sd) - set(expected))
    reshaped = sorted(k for k in set(sd) & set(expected) if sd[k].shape != expected[k].shape)
    if missing or unexpected or reshaped:
        def show(keys: list[str]) -> str:
            return ", ".join(keys[:12]) + (f" ... (+{len(keys) - 12} more)" if len(keys) > 12 else "")
        lines = [f"Checkpoint {str(path)!r} does not match the model ({model.arch!r}):"]
        if missing:
            lines.append(f"  missing ({len(missing)}): {show(missing)}")
        if unexpected:
            lines.append(f"  unexpected ({len(unexpected)}): {show(unexpected)}")
        if reshaped:
            lines.append("  wrong shape: " + show([f"{k} {tuple(sd[k].shape)} vs {tuple(expected[k].shape)}"
                                                   for k in reshaped]))
        lines.append("Check the architecture and image_size in the recipe against the checkpoint.")
        raise CheckpointError("\n".join(lines))
    model.load_state_dict(sd, strict=True)
    report.loaded = len(sd)
    logger.info(report.summary())
    return report


def load_model(path: str | os.PathLike) -> RetrievalModel:
    """Rebuild a model saved by a kd_trainer run (its folder holds ``kd_trainer_model.json``)."""
    folder = Path(path)
    cfg_file = folder / MODEL_CONFIG_NAME
    if not cfg_file.is_file():
        raise CheckpointError(f"{str(folder)!r} has no {MODEL_CONFIG_NAME}: it is not a kd_trainer output folder. "
                              "Give the architecture explicitly (recipe `arch:`) to load plain weights.")
    cfg = json.loads(cfg_file.read_text())
    model = create_model(cfg["arch"], image_size=tuple(cfg["image_size"]), context_length=cfg["context_length"],
                         projection_dim=cfg.get("projection_dim"))
    model.arch = cfg.get("arch_name") or cfg["arch"]
    load_weights(model, folder)
    return model
