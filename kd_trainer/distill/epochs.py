"""The one epoch callback: tells the train split which epoch begins, before its workers start.

Two kinds of train split draw their augmentation from the epoch: a seeded split
(:func:`kd_trainer.data.pipeline.set_augmentation_epoch`) and the teacher cache's replayed
draws (:class:`kd_trainer.data.replay.ReplayDataset`, ``set_epoch``). Both must know the epoch
before the epoch's DataLoader iterator (and its worker processes) exists, and accelerate does
not always tell them: under DDP, and on a mid-epoch resume, it wraps the batch sampler
(``BatchSamplerShard``; ``skip_first_batches``' ``SkipBatchSampler``), sets the epoch of the
sampler inside it and, by its ``if/elif``, *not* the dataset's. ``on_epoch_begin``, which the
Trainer calls right before the epoch's ``iter()``, covers every case.
"""

from __future__ import annotations

import math
from typing import Any

from transformers import TrainerCallback

from kd_trainer.data.pipeline import set_augmentation_epoch

__all__ = ["DatasetEpochCallback"]


class DatasetEpochCallback(TrainerCallback):
    """Sets the epoch of the dataset the train DataLoader reads, at the start of every epoch.

    The epoch is the Trainer's own count: ``state.epoch`` is ``e + (step + 1) / steps`` during
    epoch ``e``, so exactly ``e`` at a boundary and fractional on a mid-epoch resume, which
    resumes epoch ``floor(state.epoch)``. A split with no epoch-dependent augmentation is left
    alone.
    """

    def on_epoch_begin(self, args: Any, state: Any, control: Any, train_dataloader: Any = None,
                       **kwargs: Any) -> None:
        dataset = getattr(train_dataloader, "dataset", None)
        if dataset is None:
            return
        epoch = math.floor(float(state.epoch or 0.0) + 1e-9)
        if hasattr(dataset, "set_epoch"):
            dataset.set_epoch(epoch)
        else:
            set_augmentation_epoch(dataset, epoch)
