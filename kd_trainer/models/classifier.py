"""Image classifiers for the classification example: torchvision architectures by name.

The mimic engine is task-agnostic; this is the smallest real second task that proves it. Module
names for mimic jobs are the torchvision ones under ``net.`` (``net.layer3``, ``net.fc`` for the
logits).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
import torchvision
from torch import nn

from kd_trainer.models.loading import CheckpointError, read_state_dict

CLASSIFIER_CONFIG = "kd_trainer_classifier.json"


class Classifier(nn.Module):
    """``forward(pixel_values) -> {"logits"}`` around a randomly initialised torchvision model."""

    def __init__(self, arch: str, num_classes: int):
        super().__init__()
        builder = getattr(torchvision.models, arch, None)
        if builder is None or not callable(builder):
            raise ValueError(f"unknown torchvision architecture {arch!r} (e.g. resnet18, resnet34, resnet50)")
        self.arch, self.num_classes = arch, num_classes
        self.net = builder(weights=None, num_classes=num_classes)

    def forward(self, pixel_values: torch.Tensor) -> dict[str, torch.Tensor]:
        return {"logits": self.net(pixel_values)}

    def to_config(self) -> dict:
        return {"arch": self.arch, "num_classes": self.num_classes}


def load_classifier(arch: str, num_classes: int, checkpoint: str | None) -> Classifier:
    """A classifier, with a checkpoint (a run folder or a weights file) loaded strictly when given.

    Mimic adapters saved with a distilled student (``mimic_head.*``) are training-only and skipped.
    """
    model = Classifier(arch, num_classes)
    if checkpoint:
        folder = Path(checkpoint)
        cfg_file = folder / CLASSIFIER_CONFIG if folder.is_dir() else None
        if cfg_file is not None and cfg_file.is_file():
            cfg = json.loads(cfg_file.read_text())
            if (cfg["arch"], cfg["num_classes"]) != (arch, num_classes):
                raise CheckpointError(f"{checkpoint!r} holds a {cfg['arch']} with {cfg['num_classes']} classes, "
                                      f"but the recipe asks for a {arch} with {num_classes}")
        sd = {k: v for k, v in read_state_dict(checkpoint).items() if not k.startswith("mimic_head.")}
        missing, unexpected = model.load_state_dict(sd, strict=False)
        if missing or unexpected:
            raise CheckpointError(f"{checkpoint!r} does not match {arch}: missing {missing[:8]}, "
                                  f"unexpected {unexpected[:8]}")
    return model
