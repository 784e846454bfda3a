"""Which rows of a batch a process computes: all of them, or its own shard of a gathered batch.

Every batch-dependent term is a mean over rows, ``L = 1/B sum_i l_i``, where row ``i`` compares
sample ``i`` with every sample of the batch (the columns). After :func:`gather_features
<kd_trainer.distill.gather.gather_features>` every one of ``N`` processes holds the whole global
batch, so computing all ``B`` rows on each would repeat the same ``B x B`` work ``N`` times. With
:class:`LocalRows` process ``r`` computes only the rows of the samples it produced, against all
columns (open_clip's ``local_loss``), and returns

    ``L_r = N / B * sum_{i in rows_r} l_i``

so that the mean of ``L_r`` over processes is ``L`` exactly, for shards of any sizes. Both things
that look at a loss across processes take that mean: DDP averages the parameter gradients, and
the trainer's logs average each term over processes. The gather's backward sums the gradients of
every process's rows (each process's columns feed the other processes' rows), see
``distill/gather.py``.

This is exact because no term needs a statistic of the whole batch beyond its columns: each
row's softmax, soft target, KL or squared difference reads row ``i`` and all columns only.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

__all__ = ["LocalRows"]


@dataclass(frozen=True)
class LocalRows:
    """Rows ``start:stop`` of a global batch of ``total`` samples, this process's share of ``shards``.

    ``LocalRows(0, B, B, 1)`` is the whole batch, computed by one process: the same as no rows
    at all (``Features.rows = None``).
    """

    start: int
    stop: int
    total: int
    shards: int = 1

    def __post_init__(self) -> None:
        if not (0 <= self.start <= self.stop <= self.total) or self.shards < 1:
            raise ValueError(
                f"local rows must satisfy 0 <= start <= stop <= total and shards >= 1, got "
                f"start={self.start}, stop={self.stop}, total={self.total}, shards={self.shards}"
            )

    def of(self, x: torch.Tensor) -> torch.Tensor:
        """The rows of ``x`` (a ``total x ...`` matrix or vector) that this process computes."""
        return x[self.start : self.stop]

    def labels(self, device: torch.device) -> torch.Tensor:
        """The column of each row's positive: its own index in the global batch."""
        return torch.arange(self.start, self.stop, device=device)

    def mean(self, per_row: torch.Tensor) -> torch.Tensor:
        """``shards / total * sum(per_row)``: this process's share of the global row mean, times
        the number of processes, so that the mean over processes is the global mean."""
        return per_row.sum() * (self.shards / self.total)
