"""The notation of ``losses.md`` as tensor functions, so each term's body reads like its formula.

``sim(X, Y, tau)`` is ``X @ Y.T / tau``; ``log_p(X, Y, tau)`` is ``log P(X, Y; tau)`` (row-wise
log-softmax); ``ce``, ``sce``, ``kl`` and ``mse`` are ``CE``, ``SCE``, ``KL`` and ``MSE``.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

__all__ = ["unit", "frozen_unit", "sim", "log_p", "p", "ce", "sce", "kl", "mse", "per_side"]


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


def sim(x: torch.Tensor, y: torch.Tensor, tau: float) -> torch.Tensor:
    """``X @ Y.T / tau``: the logits of row ``i`` of ``X`` against every row of ``Y``."""
    return x @ y.T / tau


def log_p(x: torch.Tensor, y: torch.Tensor, tau: float) -> torch.Tensor:
    """``log P(X, Y; tau)``, computed with log-softmax (never the log of a softmax)."""
    return F.log_softmax(sim(x, y, tau), dim=1)


def p(x: torch.Tensor, y: torch.Tensor, tau: float) -> torch.Tensor:
    """``P(X, Y; tau)``, the row-wise softmax of ``X @ Y.T / tau``."""
    return F.softmax(sim(x, y, tau), dim=1)


def ce(logits: torch.Tensor) -> torch.Tensor:
    """``CE(L, y)`` with ``y = arange(B)`` (positives on the diagonal), mean over rows."""
    labels = torch.arange(logits.shape[0], device=logits.device)
    return F.cross_entropy(logits, labels)


def sce(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """``SCE(L, Q) = mean_i -sum_j Q_ij log softmax(L)_ij`` for a soft target ``Q``."""
    return -(target * F.log_softmax(logits, dim=1)).sum(dim=1).mean()


def kl(log_p_: torch.Tensor, log_q: torch.Tensor) -> torch.Tensor:
    """``KL(P || Q) = mean_i sum_j P_ij (log P_ij - log Q_ij)``, given ``log P`` and ``log Q``."""
    return (log_p_.exp() * (log_p_ - log_q)).sum(dim=1).mean()


def mse(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``MSE(A, B)``: mean of the squared differences over all elements."""
    return F.mse_loss(a, b)


def per_side(
    side: str,
    image: Callable[[], torch.Tensor],
    text: Callable[[], torch.Tensor],
    *,
    both: str = "mean",
) -> torch.Tensor:
    """Evaluate the image branch, the text branch, or both (their ``mean`` or ``sum``).

    The branches are callables so that a one-sided call never touches the other side's
    towers, which may be absent (MoTIS stage 1 has no student text tower).
    """
    if side == "image":
        return image()
    if side == "text":
        return text()
    if side == "both":
        total = image() + text()
        return total / 2 if both == "mean" else total
    raise ValueError(f"side must be 'image', 'text' or 'both', not {side!r}")
