"""Raw splits from :func:`kd_trainer.data.load_pedes` -> model inputs, on the fly.

Each split gets a ``Dataset.with_transform`` that decodes images, applies IRRA's
transforms and tokenises captions when rows are read, so nothing is preprocessed or
cached on disk and every epoch sees fresh augmentation. Items come out as

- ``train``:    ``pixel_values`` (3xHxW float), ``input_ids`` (context_length, int64),
                ``pids`` (int64 scalar), ``image_ids`` (int64 scalar)
- ``*_gallery``: ``pixel_values``, ``pids``, ``image_ids``
- ``*_queries``: ``input_ids``, ``pids``, ``image_ids``

and :func:`kd_trainer.data.collator.collate_retrieval` stacks them. The raw columns of a
transformed split stay readable with ``split.with_format(None)["pid"]``.
"""

from __future__ import annotations

from typing import Any, Callable

import datasets
import torch
from PIL import Image

from kd_trainer.data.formats import open_image
from kd_trainer.data.tokenizer import tokenize
from kd_trainer.data.transforms import build_image_transform

__all__ = ["RetrievalTransform", "with_retrieval_transforms"]


class RetrievalTransform:
    """Batched transform (dict of lists -> dict of tensors) for one split.

    Converts whichever raw columns the batch has, so reading a single column works too.
    A module-level class rather than a closure so that DataLoader workers can pickle it.
    """

    def __init__(self, image_transform: Callable[[Image.Image], torch.Tensor] | None,
                 context_length: int, dataset_name: str) -> None:
        self.image_transform = image_transform
        self.context_length = context_length
        self.dataset_name = dataset_name

    def __call__(self, batch: dict[str, list[Any]]) -> dict[str, torch.Tensor]:
        out: dict[str, torch.Tensor] = {}
        if "image_path" in batch and self.image_transform is not None:
            out["pixel_values"] = torch.stack(
                [self.image_transform(open_image(p, self.dataset_name)) for p in batch["image_path"]]
            )
        if "caption" in batch:
            out["input_ids"] = tokenize(list(batch["caption"]), self.context_length)
        if "pid" in batch:
            out["pids"] = torch.as_tensor(list(batch["pid"]), dtype=torch.int64)
        if "image_id" in batch:
            out["image_ids"] = torch.as_tensor(list(batch["image_id"]), dtype=torch.int64)
        return out


def with_retrieval_transforms(
    dsd: datasets.DatasetDict,
    *,
    image_size: tuple[int, int],
    augment: bool,
    context_length: int = 77,
    dataset_name: str = "",
) -> datasets.DatasetDict:
    """The same splits with on-the-fly transforms: train gets IRRA's training transform
    (``augment`` = ``--img_aug``), every other split the evaluation transform.

    ``dataset_name`` is used in error messages; by default the name stored by ``load_pedes``.
    """
    out = datasets.DatasetDict()
    for split, ds in dsd.items():
        name = dataset_name or ds.info.dataset_name or ""
        train = split == "train"
        image_tf = build_image_transform(tuple(image_size), train=train, augment=augment)
        out[split] = ds.with_transform(RetrievalTransform(image_tf, context_length, name))
    out.skipped_images = list(getattr(dsd, "skipped_images", []))
    return out
