"""Batch the items made by :func:`kd_trainer.data.with_retrieval_transforms`."""

from __future__ import annotations

from typing import Any

import torch

__all__ = ["collate_retrieval"]


def collate_retrieval(features: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
    """Stack each key over the items: ``pixel_values`` -> ``B x 3 x H x W``, ``input_ids`` ->
    ``B x L``, ``pids``/``image_ids`` -> ``B`` (int64). Plain ints are accepted as well.

    Every item must have the same keys; a mismatch is an error rather than a silent drop.
    """
    if not features:
        raise ValueError("collate_retrieval got an empty list of items")
    keys = list(features[0])
    for i, f in enumerate(features[1:], start=1):
        if set(f) != set(keys):
            raise ValueError(f"item {i} has keys {sorted(f)}, item 0 has {sorted(keys)}")
    batch: dict[str, torch.Tensor] = {}
    for k in keys:
        values = [f[k] for f in features]
        if isinstance(values[0], torch.Tensor):
            batch[k] = torch.stack(values)
        else:
            batch[k] = torch.as_tensor(values)
    return batch
