"""Global-batch features: gather every process's embeddings before a batch-dependent term.

Contrastive and relational terms compare each sample with the rest of the batch, so with N
processes of batch b they must see all N*b samples, or N processes optimise a different objective
than one process with batch N*b (docs/losses.md, "Gathering across processes"). This is written once
here and used for every term, as open_clip's ``gather_features`` is.

Two ways to split the work, both exact (the same loss and parameter gradients as one process on
the concatenated batch; ``tests/test_gather.py`` checks every batch-dependent term):

- **Local rows** (the default; open_clip's ``local_loss``). The gathered features carry
  ``rows``, this process's own samples, and every term whose spec says ``local_rows`` computes
  only those rows against all gathered columns: ``b x B`` instead of ``B x B`` per process, no
  work repeated. The term returns ``L_r = N/B sum_{i in rows_r} l_i`` (``losses/rows.py``), whose
  mean over processes is the global loss ``L``. The gradient of ``L`` for this process's shard
  ``x_s`` is ``sum_r dL_r/dx_s / N``: other processes' rows read ``x_s`` as columns. So backward
  sums the gathered gradient over processes (one all-reduce of a ``B x D`` matrix per gathered
  tower) and keeps this shard's rows: ``sum_r dL_r/dx_s = N dL/dx_s``. DDP then averages
  parameter gradients over processes, which gives exactly ``dL/dtheta``. A term that ignores
  ``rows`` (spec ``local_rows=False``) returns ``L`` on every process; the same backward then
  gives ``N dL/dx_s`` too, so it stays exact, only repeated.
- **Whole batch on every process** (``local_rows=False``). Every process computes the same
  ``L`` over the whole gathered batch, so ``dL/dX`` is the same everywhere and backward returns
  ``N * dL/dx_s`` for the local shard with no communication (the average DDP takes is then
  ``dL/dtheta``). Costs ``N`` times the loss computation of local rows.

Other processes' shards arrive as constants in forward; teacher embeddings and pids are plain
data. Per-sample terms (``fd``) need no other process's samples, but a local mean averaged by DDP
is the global mean only when every process holds as many samples; given the gathered batch,
``fd`` computes its own rows' share and is exact for any shard sizes.
"""

from __future__ import annotations

from dataclasses import fields
from typing import Any

import torch
import torch.distributed as dist

from kd_trainer.losses import Features, LocalRows

__all__ = ["gather_features"]


def _sizes(n: int, device: torch.device) -> list[int]:
    local = torch.tensor([n], device=device, dtype=torch.long)
    out = [torch.zeros_like(local) for _ in range(dist.get_world_size())]
    dist.all_gather(out, local)
    return [int(t.item()) for t in out]


def _gather_padded(x: torch.Tensor, sizes: list[int]) -> torch.Tensor:
    """All shards concatenated in rank order; shards may differ in length (a short last batch)."""
    biggest = max(sizes)
    if x.shape[0] < biggest:
        x = torch.cat([x, x.new_zeros((biggest - x.shape[0], *x.shape[1:]))])
    out = [torch.empty_like(x) for _ in sizes]
    dist.all_gather(out, x.contiguous())
    return torch.cat([o[:n] for o, n in zip(out, sizes)])


def _shard(grad: torch.Tensor, sizes: list[int]) -> torch.Tensor:
    start = sum(sizes[: dist.get_rank()])
    return grad[start : start + sizes[dist.get_rank()]]


class _Gather(torch.autograd.Function):
    """Every process's rows, concatenated (padded shards trimmed); subclasses say how backward
    turns the gathered gradient into this process's shard."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, sizes: list[int]) -> torch.Tensor:  # type: ignore[override]
        ctx.sizes = sizes
        return _gather_padded(x.detach(), sizes)


class _GatherLocalGrad(_Gather):
    """Whole batch on every process: every process holds the same ``dL/dX``, no communication."""

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None]:  # type: ignore[override]
        return _shard(grad, ctx.sizes) * len(ctx.sizes), None


class _GatherSummedGrad(_Gather):
    """Local rows: each process holds the gradient of its own rows; the shard's total is their sum."""

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None]:  # type: ignore[override]
        total = grad.contiguous().clone()  # all_reduce works in place; autograd's grad is not ours
        dist.all_reduce(total, op=dist.ReduceOp.SUM)
        return _shard(total, ctx.sizes), None


def gather_features(features: Features, *, local_rows: bool = True) -> Features:
    """The global batch: every embedding and the pids gathered across processes, in rank order.

    Student embeddings keep their gradient for the local shard (as the module docstring
    explains); teacher embeddings and pids are plain data. With ``local_rows`` (the default) the
    result's ``rows`` names this process's samples, and terms that support it compute only
    those rows; each process's value of such a term is then its share of the global loss times
    the number of processes, and the mean over processes is the global loss. A no-op in a
    single process (``rows`` stays ``None``: every row).
    """
    if features.rows is not None:
        raise ValueError(f"these features are already a gathered batch (rows={features.rows}); gather them once")
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return features
    present = {f.name: getattr(features, f.name) for f in fields(features) if f.name != "rows"}
    present = {k: v for k, v in present.items() if v is not None}
    if not present:
        return features
    lengths = {k: v.shape[0] for k, v in present.items()}
    if len(set(lengths.values())) > 1:
        raise ValueError(f"cannot gather features of different batch sizes: {lengths}")
    first = next(iter(present.values()))
    sizes = _sizes(first.shape[0], first.device)
    gather = _GatherSummedGrad if local_rows else _GatherLocalGrad
    out: dict[str, Any] = {
        name: gather.apply(value, sizes) if value.requires_grad else _gather_padded(value, sizes)
        for name, value in present.items()
    }
    if local_rows:
        start = sum(sizes[: dist.get_rank()])
        out["rows"] = LocalRows(start, start + sizes[dist.get_rank()], sum(sizes), len(sizes))
    return Features(**out)
