"""SynthDet as a dataset: one split of the COCO-style set that
:func:`kd_trainer.synthetic.detection.make_synth_det` writes, in the form torchvision's detection
models take (a float image in ``[0, 1]``; the detector normalises it itself), and its collator."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import Dataset
from torchvision.transforms.functional import pil_to_tensor

from kd_trainer.data.errors import DatasetFormatError
from kd_trainer.data.images import open_image

__all__ = ["SynthDetDataset", "collate_detection"]


class SynthDetDataset(Dataset):
    """One split as items ``{"pixel_values": 3xHxW float in [0, 1], "boxes": Nx4 float (x0, y0, x1, y1),
    "labels": N int64 (1..K), "image_id": int64}``; ``train=True`` adds a random horizontal flip.

    ``coco`` is the split's COCO-style annotation dict (ground truth for :mod:`kd_trainer.det_metrics`).
    """

    def __init__(self, root: str | Path, split: str, *, train: bool):
        self.root = Path(root)
        ann = self.root / f"{split}.json"
        if not ann.is_file():
            raise DatasetFormatError(f"SynthDet split file {ann} not found; generate the set with make_synth_det")
        self.coco: dict[str, Any] = json.loads(ann.read_text())
        self.train = train
        by_image: dict[int, list[dict]] = {im["id"]: [] for im in self.coco["images"]}
        for a in self.coco["annotations"]:
            if a["image_id"] not in by_image:
                raise DatasetFormatError(f"{ann}: annotation {a['id']} names image {a['image_id']}, which is "
                                         "not listed")
            by_image[a["image_id"]].append(a)
        self.images = self.coco["images"]
        self.objects = by_image
        self.num_classes = len(self.coco["categories"])

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        info = self.images[i]
        path = self.root / info["file_name"]
        x = pil_to_tensor(open_image(path, "SynthDet")).float() / 255.0  # one rule for every image read
        objs = self.objects[info["id"]]
        boxes = torch.tensor([[a["bbox"][0], a["bbox"][1], a["bbox"][0] + a["bbox"][2], a["bbox"][1] + a["bbox"][3]]
                              for a in objs], dtype=torch.float32).reshape(-1, 4)
        labels = torch.tensor([a["category_id"] for a in objs], dtype=torch.int64)
        if self.train and torch.rand(()) < 0.5:
            w = x.shape[-1]
            x = x.flip(-1)
            boxes = torch.stack([w - boxes[:, 2], boxes[:, 1], w - boxes[:, 0], boxes[:, 3]], dim=1)
        return {"pixel_values": x, "boxes": boxes, "labels": labels,
                "image_id": torch.tensor(info["id"], dtype=torch.int64)}


def collate_detection(items: list[dict[str, torch.Tensor]]) -> dict[str, Any]:
    """A batch: ``pixel_values`` stacked (B x 3 x H x W; SynthDet images share one size),
    ``targets`` a list of ``{"boxes", "labels"}`` (torchvision's format) and ``image_ids``."""
    sizes = {tuple(it["pixel_values"].shape) for it in items}
    if len(sizes) != 1:
        raise DatasetFormatError(f"a detection batch needs images of one size, got {sorted(sizes)}")
    return {"pixel_values": torch.stack([it["pixel_values"] for it in items]),
            "targets": [{"boxes": it["boxes"], "labels": it["labels"]} for it in items],
            "image_ids": torch.stack([it["image_id"] for it in items])}
