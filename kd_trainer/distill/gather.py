"""Global-batch features: gather every process's embeddings before a batch-dependent term.

Contrastive and relational terms compare each sample with the rest of the batch, so with N
processes of batch b they must see all N*b samples, or N processes optimise a different objective
than one process with batch N*b (losses.md, "Gathering across processes"). This is written once
here and used for every term, as open_clip's ``gather_features`` is.

The gradient. Every process computes the *same* loss ``L`` over the *same* gathered batch, so
``dL/dX`` (X = the gathered features) is the same on every process. The exact gradient for this
process's parameters is ``sum_r dL/dx_r`` over the shards it produced; DDP then *averages* the
parameter gradients over processes. Returning ``N * dL/dx_local`` for the local shard makes that
average exactly the single-process gradient, with no extra communication in backward (a
backward all-reduce of ``dL/dX`` would give the same numbers). Other processes' shards arrive as
constants. Per-sample terms (``fd``) need none of this: a local mean, averaged by DDP, is the
global mean.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist

from kd_trainer.losses import Features


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


class _GatherLocalGrad(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, sizes: list[int]) -> torch.Tensor:  # type: ignore[override]
        ctx.rank, ctx.sizes = dist.get_rank(), sizes
        return _gather_padded(x.detach(), sizes)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None]:  # type: ignore[override]
        start = sum(ctx.sizes[: ctx.rank])
        return grad[start:start + ctx.sizes[ctx.rank]] * len(ctx.sizes), None


def gather_features(features: Features) -> Features:
    """The global batch: every field gathered across processes, in rank order.

    Student embeddings keep their gradient for the local shard (scaled as the module docstring
    explains); teacher embeddings and pids are plain data. A no-op in a single process.
    """
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return features
    present = {k: v for k, v in vars(features).items() if v is not None}
    if not present:
        return features
    first = next(iter(present.values()))
    sizes = _sizes(first.shape[0], first.device)
    out = {}
    for name, value in present.items():
        if value.requires_grad:
            out[name] = _GatherLocalGrad.apply(value, sizes)
        else:
            out[name] = _gather_padded(value, sizes)
    return Features(**out)
