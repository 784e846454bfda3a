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

Seeded augmentation. Given a ``seed``, the train split's random augmentation of row ``i`` in
epoch ``e`` is drawn from its own generator state, seeded by ``(seed, e, i)``, instead of from
torch's global RNG. The images a run sees then depend on nothing but the seed, the epoch and the
row: not on the number of DataLoader workers, not on how many batches were skipped, and not on
when the Trainer restores its RNG state when resuming (transformers restores it only *after*
drawing the first resumed batch, so an augmentation fed by the global RNG makes a resumed run
drift from the uninterrupted one). The Trainer sets the epoch (:func:`set_augmentation_epoch`)
before each epoch's DataLoader iterator is created, which is when worker processes copy it.
"""

from __future__ import annotations

from typing import Any, Callable

import datasets
import torch
from PIL import Image

from kd_trainer.data.formats import PedesSplits
from kd_trainer.data.images import open_image
from kd_trainer.data.tokenizer import tokenize
from kd_trainer.data.transforms import build_image_transform, run_seeded, stable_seed

__all__ = ["RetrievalTransform", "augmentation_seed", "set_augmentation_epoch", "with_retrieval_transforms"]

ROW_COLUMN = "row_index"  # added to a seeded train split: the row's position keys its augmentation


def augmentation_seed(seed: int, epoch: int, row: int) -> int:
    """A stable seed for one row's augmentation in one epoch."""
    return stable_seed(f"{seed}:{epoch}:{row}")


class RetrievalTransform:
    """Batched transform (dict of lists -> dict of tensors) for one split.

    Converts whichever raw columns the batch has, so reading a single column works too.
    A module-level class rather than a closure so that DataLoader workers can pickle it.
    """

    def __init__(self, image_transform: Callable[[Image.Image], torch.Tensor] | None,
                 context_length: int, dataset_name: str, seed: int | None = None) -> None:
        self.image_transform = image_transform
        self.context_length = context_length
        self.dataset_name = dataset_name
        self.seed = seed
        self.epoch = 0

    def _image(self, path: str, row: int | None) -> torch.Tensor:
        assert self.image_transform is not None
        image = open_image(path, self.dataset_name)
        if self.seed is None or row is None:
            return self.image_transform(image)
        return run_seeded(self.image_transform, image, augmentation_seed(self.seed, self.epoch, row))

    def __call__(self, batch: dict[str, list[Any]]) -> dict[str, torch.Tensor]:
        out: dict[str, torch.Tensor] = {}
        if "image_path" in batch and self.image_transform is not None:
            rows = batch.get(ROW_COLUMN) or [None] * len(batch["image_path"])
            out["pixel_values"] = torch.stack([self._image(p, r) for p, r in zip(batch["image_path"], rows)])
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
    seed: int | None = None,
) -> datasets.DatasetDict:
    """The same splits with on-the-fly transforms: train gets IRRA's training transform
    (``augment`` = ``--img_aug``), every other split the evaluation transform.

    ``dataset_name`` is used in error messages; by default the name stored by ``load_pedes``.
    ``seed`` makes the train split's augmentation a function of (seed, epoch, row) (see above).
    """
    out = PedesSplits()
    for split, ds in dsd.items():
        name = dataset_name or ds.info.dataset_name or ""
        train = split == "train"
        image_tf = build_image_transform(tuple(image_size), train=train, augment=augment)
        split_seed = seed if train else None
        if split_seed is not None:
            ds = ds.add_column(ROW_COLUMN, list(range(len(ds))))
        out[split] = ds.with_transform(RetrievalTransform(image_tf, context_length, name, seed=split_seed))
    if isinstance(dsd, PedesSplits):
        out.skipped_images, out.load_report = list(dsd.skipped_images), dsd.load_report
    return out


def set_augmentation_epoch(dataset: Any, epoch: int) -> bool:
    """Tell a seeded split which epoch is starting; False if it has no seeded transform."""
    fmt = getattr(dataset, "format", None) or {}
    transform = (fmt.get("format_kwargs") or {}).get("transform")
    if isinstance(transform, RetrievalTransform) and transform.seed is not None:
        transform.epoch = int(epoch)
        return True
    return False
