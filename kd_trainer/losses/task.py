"""Task terms: the retrieval objective (InfoNCE over student and hybrid pairs, and IRRA's SDM).

Notation as in ``docs/losses.md``: ``vs, ts`` student image / text, ``vt, tt`` teacher image / text,
all L2-normalised; ``y = arange(B)``.

Every term here is a mean over rows, each row reading one sample against all columns, so each
computes only ``features.rows`` when given (``local_rows=True``, ``rows.py``): in both directions
of a symmetric term, the rows are this process's own samples.
"""

from __future__ import annotations

import torch

from kd_trainer.losses.notation import ce, frozen_unit, kl, log_p, sim, unit
from kd_trainer.losses.registry import Features, register_term
from kd_trainer.losses.rows import LocalRows

__all__ = ["itc", "st_itc", "ts_itc", "sdm", "info_nce"]


def info_nce(x: torch.Tensor, y: torch.Tensor, tau: float, rows: LocalRows | None = None) -> torch.Tensor:
    """``1/2 [CE(x y^T/tau, y) + CE(y x^T/tau, y)]`` for L2-normalised ``x``, ``y`` (only ``rows``
    of each direction when given)."""
    return (ce(sim(x, y, tau, rows), rows) + ce(sim(y, x, tau, rows), rows)) / 2


@register_term("itc", kind="task", reads={"both": ("student_image", "student_text")}, local_rows=True)
@register_term("ss_itc", kind="task", reads={"both": ("student_image", "student_text")}, local_rows=True)
def itc(features: Features, *, temperature: float, side: str = "both") -> torch.Tensor:
    """InfoNCE between the student image and text embeddings (``ss_itc`` is the same term).

    ``1/2 [CE(vs ts^T/tau, y) + CE(ts vs^T/tau, y)]``
    """
    return info_nce(unit(features.student_image), unit(features.student_text), temperature, features.rows)


@register_term(
    "st_itc", kind="task", reads={"both": ("student_image", "teacher_text")}, direct_compare=True, local_rows=True
)
def st_itc(features: Features, *, temperature: float, side: str = "both") -> torch.Tensor:
    """InfoNCE of the student image embeddings against the (frozen) teacher text embeddings.

    ``1/2 [CE(vs tt^T/tau, y) + CE(tt vs^T/tau, y)]``; trains the student image tower only.
    """
    return info_nce(unit(features.student_image), frozen_unit(features.teacher_text), temperature, features.rows)


@register_term(
    "ts_itc", kind="task", reads={"both": ("teacher_image", "student_text")}, direct_compare=True, local_rows=True
)
def ts_itc(features: Features, *, temperature: float, side: str = "both") -> torch.Tensor:
    """InfoNCE of the (frozen) teacher image embeddings against the student text embeddings.

    ``1/2 [CE(vt ts^T/tau, y) + CE(ts vt^T/tau, y)]``; trains the student text tower only.
    """
    return info_nce(frozen_unit(features.teacher_image), unit(features.student_text), temperature, features.rows)


@register_term(
    "sdm", kind="task", reads={"both": ("student_image", "student_text")}, needs_pids=True, local_rows=True
)
def sdm(features: Features, *, temperature: float, side: str = "both", epsilon: float = 1e-8) -> torch.Tensor:
    """IRRA's similarity distribution matching, on the student image and text embeddings.

    ``q_ij = [pid_i == pid_j] / sum_j [pid_i == pid_j]``;
    ``L = KL(P(vs, ts; tau) || q) + KL(P(ts, vs; tau) || q)`` with ``log(q + epsilon)``.

    IRRA scales the cosines by its logit scale (``1 / 0.02``); here that is ``1 / tau``.
    Row ``i`` of ``q`` reads pid ``i`` against all pids, so local rows stay exact.
    """
    v, t, r = unit(features.student_image), unit(features.student_text), features.rows
    pids = features.pids.reshape(-1)
    mine = pids if r is None else r.of(pids)
    match = (mine[:, None] == pids[None, :]).to(v.dtype)
    log_q = torch.log(match / match.sum(dim=1, keepdim=True) + epsilon)
    return kl(log_p(v, t, temperature, r), log_q, r) + kl(log_p(t, v, temperature, r), log_q, r)
