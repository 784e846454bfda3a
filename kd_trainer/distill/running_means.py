"""Per-key means of the values a trainer records each micro-batch, flushed at every training log.

Both trainers log every loss term this way: ``compute_loss`` adds the step's detached values under
their log keys, and ``log`` replaces them by their means since the last log, averaged over
processes. Each key is averaged over the micro-batches that produced it only, so a window in which
a key appears part of the time (a stage boundary) is not diluted.
"""

from __future__ import annotations

from typing import Any

import torch


class RunningMeans:
    def __init__(self) -> None:
        self._sums: dict[str, torch.Tensor] = {}
        self._counts: dict[str, int] = {}

    def add(self, values: dict[str, torch.Tensor]) -> None:
        for k, v in values.items():
            v = v.detach().float()
            self._sums[k] = self._sums[k] + v if k in self._sums else v.clone()
            self._counts[k] = self._counts.get(k, 0) + 1

    def __bool__(self) -> bool:
        return bool(self._sums)

    def pop(self, accelerator: Any) -> dict[str, float]:
        """The means since the last call (reduced over processes), and start afresh."""
        keys = list(self._sums)
        means = torch.stack([self._sums[k] / self._counts[k] for k in keys])
        means = accelerator.reduce(means, reduction="mean")
        self._sums, self._counts = {}, {}
        return {k: round(float(v), 6) for k, v in zip(keys, means.tolist())}
