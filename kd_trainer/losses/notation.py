"""The notation of ``docs/losses.md`` as tensor functions, so each term's body reads like its formula.

``sim(X, Y, tau)`` is ``X @ Y.T / tau``; ``cos(X, Y)`` is ``X @ Y.T``; ``log_p(X, Y, tau)`` is
``log P(X, Y; tau)`` (row-wise log-softmax); ``ce``, ``sce``, ``kl`` and ``mse`` are ``CE``,
``SCE``, ``KL`` and ``MSE``.

Every function takes an optional ``rows`` (:class:`~kd_trainer.losses.rows.LocalRows`): the
matrices then hold only those rows of ``X`` (against all of ``Y``), and the reductions return
those rows' share of the global mean (``rows.py``). ``rows=None`` is the whole batch.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

from kd_trainer.losses.rows import LocalRows

__all__ = ["unit", "frozen_unit", "sim", "cos", "log_p", "p", "ce", "sce", "kl", "mse", "row_mean", "per_side"]


def unit(x: torch.Tensor) -> torch.Tensor:
    """Row-wise L2 normalisation of a student embedding (gradient flows through it)."""
    # Softmaxes over logits scaled by 1/0.02 lose too much in half precision.
    if x.dtype in (torch.float16, torch.bfloat16):
        x = x.float()
    return F.normalize(x, dim=-1)


def frozen_unit(x: torch.Tensor) -> torch.Tensor:
    """Row-wise L2 normalisation of a teacher embedding, detached.

    A loss term never trains the teacher, even when it is handed tensors that carry a graph
    (for instance a teacher tower shared with the student by mistake).
    """
    return unit(x.detach())


def _rows_of(x: torch.Tensor, rows: LocalRows | None) -> torch.Tensor:
    return x if rows is None else rows.of(x)


def cos(x: torch.Tensor, y: torch.Tensor, rows: LocalRows | None = None) -> torch.Tensor:
    """``X @ Y.T`` (cosines, for unit rows): row ``i`` of ``X`` against every row of ``Y``."""
    return _rows_of(x, rows) @ y.T


def sim(x: torch.Tensor, y: torch.Tensor, tau: float, rows: LocalRows | None = None) -> torch.Tensor:
    """``X @ Y.T / tau``: the logits of row ``i`` of ``X`` against every row of ``Y``."""
    return cos(x, y, rows) / tau


def log_p(x: torch.Tensor, y: torch.Tensor, tau: float, rows: LocalRows | None = None) -> torch.Tensor:
    """``log P(X, Y; tau)``, computed with log-softmax (never the log of a softmax)."""
    return F.log_softmax(sim(x, y, tau, rows), dim=1)


def p(x: torch.Tensor, y: torch.Tensor, tau: float, rows: LocalRows | None = None) -> torch.Tensor:
    """``P(X, Y; tau)``, the row-wise softmax of ``X @ Y.T / tau``."""
    return F.softmax(sim(x, y, tau, rows), dim=1)


def row_mean(per_row: torch.Tensor, rows: LocalRows | None = None) -> torch.Tensor:
    """``mean_i`` of a per-row loss: over the batch, or ``rows``' share of the global mean."""
    return per_row.mean() if rows is None else rows.mean(per_row)


def ce(logits: torch.Tensor, rows: LocalRows | None = None) -> torch.Tensor:
    """``CE(L, y)`` with ``y = arange(B)`` (positives on the diagonal), mean over rows."""
    if rows is None:
        return F.cross_entropy(logits, torch.arange(logits.shape[0], device=logits.device))
    return rows.mean(F.cross_entropy(logits, rows.labels(logits.device), reduction="none"))


def sce(logits: torch.Tensor, target: torch.Tensor, rows: LocalRows | None = None) -> torch.Tensor:
    """``SCE(L, Q) = mean_i -sum_j Q_ij log softmax(L)_ij`` for a soft target ``Q``."""
    return row_mean(-(target * F.log_softmax(logits, dim=1)).sum(dim=1), rows)


def kl(log_p_: torch.Tensor, log_q: torch.Tensor, rows: LocalRows | None = None) -> torch.Tensor:
    """``KL(P || Q) = mean_i sum_j P_ij (log P_ij - log Q_ij)``, given ``log P`` and ``log Q``."""
    return row_mean((log_p_.exp() * (log_p_ - log_q)).sum(dim=1), rows)


def mse(a: torch.Tensor, b: torch.Tensor, rows: LocalRows | None = None) -> torch.Tensor:
    """``MSE(A, B)``: mean of the squared differences over all elements."""
    if rows is None:
        return F.mse_loss(a, b)
    return rows.mean((a - b).pow(2).mean(dim=1))


def per_side(
    side: str,
    image: Callable[[], torch.Tensor],
    text: Callable[[], torch.Tensor],
    *,
    both: str = "mean",
) -> torch.Tensor:
    """Evaluate the image branch, the text branch, or both (their ``mean`` or ``sum``).

    The branches are callables so that a one-sided call never touches the other side's
    embeddings, which may be absent (MoTIS stage 1 computes no student text embeddings).
    """
    if side == "image":
        return image()
    if side == "text":
        return text()
    if side == "both":
        total = image() + text()
        return total / 2 if both == "mean" else total
    raise ValueError(f"side must be 'image', 'text' or 'both', not {side!r}")
