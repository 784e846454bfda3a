"""SynthShapes as a dataset: one split of the ImageFolder layout that
:func:`kd_trainer.synthetic.shapes.make_synth_shapes` writes (``<root>/{train,test}/<class>/<n>.png``)."""

from __future__ import annotations

from pathlib import Path

import torch
from torch.utils.data import Dataset
from torchvision import transforms as T

from kd_trainer.data.images import open_image


class ShapesDataset(Dataset):
    """One split as items ``{"pixel_values": 3xHxW float, "labels": int64}`` (ImageFolder order)."""

    MEAN = (0.5, 0.5, 0.5)
    STD = (0.25, 0.25, 0.25)

    def __init__(self, root: str | Path, split: str, *, train: bool):
        folder = Path(root) / split
        if not folder.is_dir():
            raise FileNotFoundError(f"SynthShapes split folder {folder} not found; generate it with make_synth_shapes")
        self.classes = sorted(p.name for p in folder.iterdir() if p.is_dir())
        self.items = [(p, ci) for ci, c in enumerate(self.classes) for p in sorted((folder / c).glob("*.png"))]
        if not self.items:
            raise FileNotFoundError(f"no images under {folder}")
        steps = [T.RandomHorizontalFlip()] if train else []
        self.transform = T.Compose([*steps, T.ToTensor(), T.Normalize(self.MEAN, self.STD)])

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        path, label = self.items[i]
        x = self.transform(open_image(path, "SynthShapes"))  # one rule for every image read
        return {"pixel_values": x, "labels": torch.tensor(label, dtype=torch.long)}
