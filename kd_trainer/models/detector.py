"""Detectors for the detection example: torchvision's Faster R-CNN on a ResNet(depth) + FPN backbone.

UP/EOD's detection distillation example (``faster_rcnn_r152_50_1x_feature_mimic``) has a
ResNet-152 Faster R-CNN teach a ResNet-50 one by mimicking FPN features. :class:`Detector` is
torchvision's ``FasterRCNN`` itself (so mimic jobs name its modules as torchvision does:
``backbone.body.layer3``, ``backbone.fpn``, ``rpn.head``, ``roi_heads.box_head``), built by
depth (18, 34, 50, 101, 152) from random initialisation or a local checkpoint, never from a
download (``weights=None``: nothing is fetched at run time).

Its only addition is the call the trainers make, ``forward(pixel_values, targets=None)``: in
training mode it returns torchvision's loss dict (``loss_classifier``, ``loss_box_reg``,
``loss_objectness``, ``loss_rpn_box_reg``), which is the task loss; in eval mode, one dict of
``boxes`` / ``scores`` / ``labels`` per image.

An architecture is data (:class:`DetectorConfig`): a name ``fasterrcnn_resnet<depth>_fpn``, or a
dict of the config's fields (``{depth: 18, fpn_channels: 128, anchor_sizes: [8, 16, 32, 64, 128]}``).
The FPN width may differ between student and teacher: mimic adapters bridge it per level.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any, Literal

import torch
import torchvision
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator
from torch import nn
from torchvision.models.detection import FasterRCNN
from torchvision.models.detection.faster_rcnn import FastRCNNPredictor, TwoMLPHead
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.models.detection.backbone_utils import BackboneWithFPN
from torchvision.ops import FrozenBatchNorm2d
from torchvision.ops.feature_pyramid_network import LastLevelMaxPool

from kd_trainer.models.loading import CheckpointError, read_state_dict

__all__ = ["DEPTHS", "DETECTOR_CONFIG", "Detector", "DetectorConfig", "detector_config", "load_detector"]

DETECTOR_CONFIG = "kd_trainer_detector.json"
DEPTHS = (18, 34, 50, 101, 152)
_NAME = re.compile(r"^fasterrcnn_resnet(\d+)_fpn$")
# The parts of a config that decide the weights' shapes: a checkpoint must agree on them.
_SHAPE_FIELDS = ("depth", "fpn_channels", "num_classes", "representation_size")


class DetectorConfig(BaseModel):
    """One Faster R-CNN: backbone depth, FPN width, anchors, and the proposal counts that matter
    at small image sizes. Field names after torchvision's ``FasterRCNN`` arguments where it has one."""

    model_config = ConfigDict(extra="forbid")

    depth: int = Field(description="ResNet depth: 18, 34, 50, 101 or 152.")
    num_classes: int = Field(gt=0, description="Object classes, without the background (the data's).")
    min_size: int = Field(800, gt=0, description="Images are resized so their short side is this (torchvision).")
    max_size: int = Field(1333, gt=0, description="... and their long side at most this.")
    fpn_channels: int = Field(256, gt=0, description="Width of every FPN level (torchvision: 256).")
    representation_size: int = Field(1024, gt=0, description="Width of the box head's two MLP layers.")
    anchor_sizes: tuple[int, int, int, int, int] = Field(
        (32, 64, 128, 256, 512), description="One anchor size per FPN level (0, 1, 2, 3, pool), 3 aspect ratios each.")
    norm: Literal["batch", "frozen"] = Field(
        "batch", description="Backbone normalisation: batch (trained from scratch, torchvision's choice without "
                             "pretrained weights) or frozen (FrozenBatchNorm2d, for a pretrained backbone).")
    rpn_pre_nms_top_n_train: int = Field(2000, gt=0)
    rpn_post_nms_top_n_train: int = Field(2000, gt=0)
    rpn_pre_nms_top_n_test: int = Field(1000, gt=0)
    rpn_post_nms_top_n_test: int = Field(1000, gt=0)
    box_batch_size_per_image: int = Field(512, gt=0, description="Proposals sampled per image for the box loss.")
    box_detections_per_img: int = Field(100, gt=0)

    @field_validator("depth")
    @classmethod
    def _depth(cls, v: int) -> int:
        if v not in DEPTHS:
            raise ValueError(f"ResNet depth {v} is not one of {', '.join(map(str, DEPTHS))}")
        return v


def detector_config(arch: str | dict[str, Any], *, num_classes: int, image_size: int) -> DetectorConfig:
    """The config of ``arch`` (a ``fasterrcnn_resnet<depth>_fpn`` name or a dict of fields) for
    ``num_classes`` classes and square images of ``image_size`` (the resize keeps them as they are)."""
    if isinstance(arch, str):
        m = _NAME.match(arch)
        if m is None:
            raise ValueError(f"unknown detector architecture {arch!r}: name one as fasterrcnn_resnet<depth>_fpn "
                             f"(depth {', '.join(map(str, DEPTHS))}) or give a dict of DetectorConfig fields "
                             f"({', '.join(DetectorConfig.model_fields)})")
        fields: dict[str, Any] = {"depth": int(m.group(1))}
    else:
        fields = dict(arch)
    for key in ("num_classes", "min_size", "max_size"):
        if key in fields:
            raise ValueError(f"detector architecture: {key!r} comes from the data (data.det), not the architecture")
    try:
        return DetectorConfig(**fields, num_classes=num_classes, min_size=image_size, max_size=image_size)
    except ValidationError as e:
        problems = "; ".join(f"{'.'.join(map(str, err['loc'])) or 'arch'}: {err['msg'].removeprefix('Value error, ')}"
                             for err in e.errors())
        raise ValueError(f"detector architecture {arch!r}: {problems}") from None


class Detector(FasterRCNN):
    """torchvision's ``FasterRCNN`` built from a :class:`DetectorConfig`, called as
    ``forward(pixel_values, targets=None)`` (see the module docstring)."""

    def __init__(self, config: DetectorConfig) -> None:
        norm = FrozenBatchNorm2d if config.norm == "frozen" else nn.BatchNorm2d
        resnet = getattr(torchvision.models, f"resnet{config.depth}")(weights=None, norm_layer=norm)
        stage2 = resnet.inplanes // 8  # layer1's width: 64 (basic blocks) or 256 (bottlenecks)
        backbone = BackboneWithFPN(resnet, {f"layer{k}": str(k - 1) for k in (1, 2, 3, 4)},
                                   [stage2 * 2 ** k for k in range(4)], config.fpn_channels,
                                   extra_blocks=LastLevelMaxPool())
        anchors = AnchorGenerator(sizes=tuple((s,) for s in config.anchor_sizes),
                                  aspect_ratios=((0.5, 1.0, 2.0),) * len(config.anchor_sizes))
        box_head = TwoMLPHead(config.fpn_channels * 7 * 7, config.representation_size)
        classes = config.num_classes + 1  # + background
        super().__init__(
            backbone, min_size=config.min_size, max_size=config.max_size, rpn_anchor_generator=anchors,
            box_head=box_head, box_predictor=FastRCNNPredictor(config.representation_size, classes),
            rpn_pre_nms_top_n_train=config.rpn_pre_nms_top_n_train,
            rpn_post_nms_top_n_train=config.rpn_post_nms_top_n_train,
            rpn_pre_nms_top_n_test=config.rpn_pre_nms_top_n_test,
            rpn_post_nms_top_n_test=config.rpn_post_nms_top_n_test,
            box_batch_size_per_image=config.box_batch_size_per_image,
            box_detections_per_img=config.box_detections_per_img,
        )
        self.detector_config = config  # not `config`: transformers.Trainer treats model.config as a HF config

    def forward(self, pixel_values: torch.Tensor | list[torch.Tensor],  # type: ignore[override]
                targets: list[dict[str, torch.Tensor]] | None = None) -> Any:
        """Training: the loss dict (``targets`` required). Eval: one detection dict per image;
        boxes in the input images' pixels."""
        if self.training and targets is None:
            raise ValueError("a Detector in training mode needs targets (boxes and labels per image); "
                             "call .eval() to detect")
        return super().forward(list(pixel_values), targets)

    def to_config(self) -> dict[str, Any]:
        return self.detector_config.model_dump(mode="json")


def _is_resnet_classifier(sd: dict[str, torch.Tensor]) -> bool:
    return "conv1.weight" in sd and any(k.startswith("layer1.") for k in sd) and not any(
        k.startswith("backbone.") for k in sd)


def load_detector(arch: str | dict[str, Any], *, num_classes: int, image_size: int,
                  checkpoint: str | None = None) -> Detector:
    """A :class:`Detector`, randomly initialised, or with a local ``checkpoint`` loaded strictly:

    - a kd_trainer run folder or a detector state-dict file (torchvision's ``FasterRCNN`` keys):
      every tensor must match (a run folder's ``kd_trainer_detector.json`` is compared first, so a
      different depth, FPN width or class count is named as such); a distilled student's mimic
      adapters (``mimic_head.*``) are training-only and skipped;
    - a torchvision ResNet classifier state dict (``conv1.weight``, ``layer1...``, ``fc.*``): loaded
      into ``backbone.body``, the classifier's ``fc`` dropped (its ImageNet weights, for example).
    """
    model = Detector(detector_config(arch, num_classes=num_classes, image_size=image_size))
    if not checkpoint:
        return model
    folder = Path(checkpoint)
    cfg_file = folder / DETECTOR_CONFIG if folder.is_dir() else None
    if cfg_file is not None and cfg_file.is_file():
        saved = json.loads(cfg_file.read_text())
        differ = [f"{k} {saved.get(k)!r} vs {getattr(model.detector_config, k)!r}" for k in _SHAPE_FIELDS
                  if saved.get(k) != getattr(model.detector_config, k)]
        if differ:
            raise CheckpointError(f"{checkpoint!r} holds a detector that differs from the recipe's (checkpoint vs "
                                  f"recipe): {'; '.join(differ)}")
    sd = {k.removeprefix("module."): v for k, v in read_state_dict(checkpoint).items()}
    target: nn.Module = model
    if _is_resnet_classifier(sd):
        sd = {k: v for k, v in sd.items() if not k.startswith("fc.")}  # the ImageNet classifier head
        target = model.backbone.body
    else:
        sd = {k: v for k, v in sd.items() if not k.startswith("mimic_head.")}
    own = target.state_dict()
    resized = [f"{k} {tuple(v.shape)} vs {tuple(own[k].shape)}" for k, v in sd.items()
               if k in own and own[k].shape != v.shape]
    if resized:
        raise CheckpointError(f"{checkpoint!r} does not fit {arch!r} ({num_classes} classes): tensor shapes differ "
                              f"(checkpoint vs model): {resized[:6]}")
    missing, unexpected = target.load_state_dict(sd, strict=False)
    if missing or unexpected:
        raise CheckpointError(f"{checkpoint!r} does not match {arch!r}: missing {list(missing)[:8]}, "
                              f"unexpected {list(unexpected)[:8]}")
    return model
