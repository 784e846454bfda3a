"""Task terms: the retrieval objective (InfoNCE over student and hybrid pairs, and IRRA's SDM).

Notation as in ``losses.md``: ``vs, ts`` student image / text, ``vt, tt`` teacher image / text,
all L2-normalised; ``y = arange(B)``.
"""

from __future__ import annotations

import torch

from kd_trainer.losses.notation import ce, frozen_unit, kl, log_p, sim, unit
from kd_trainer.losses.registry import Features, register_term

__all__ = ["itc", "st_itc", "ts_itc", "sdm", "info_nce"]


def info_nce(x: torch.Tensor, y: torch.Tensor, tau: float) -> torch.Tensor:
    """``1/2 [CE(x y^T/tau, y) + CE(y x^T/tau, y)]`` for L2-normalised ``x``, ``y``."""
    return (ce(sim(x, y, tau)) + ce(sim(y, x, tau))) / 2


@register_term("itc", kind="task", reads={"both": ("student_image", "student_text")})
@register_term("ss_itc", kind="task", reads={"both": ("student_image", "student_text")})
def itc(features: Features, *, temperature: float, side: str = "both") -> torch.Tensor:
    """InfoNCE between the student towers (``ss_itc`` is the same term).

    ``1/2 [CE(vs ts^T/tau, y) + CE(ts vs^T/tau, y)]``
    """
    return info_nce(unit(features.student_image), unit(features.student_text), temperature)


@register_term("st_itc", kind="task", reads={"both": ("student_image", "teacher_text")}, direct_compare=True)
def st_itc(features: Features, *, temperature: float, side: str = "both") -> torch.Tensor:
    """InfoNCE of the student image tower against the (frozen) teacher text tower.

    ``1/2 [CE(vs tt^T/tau, y) + CE(tt vs^T/tau, y)]``; trains the student image tower only.
    """
    return info_nce(unit(features.student_image), frozen_unit(features.teacher_text), temperature)


@register_term("ts_itc", kind="task", reads={"both": ("teacher_image", "student_text")}, direct_compare=True)
def ts_itc(features: Features, *, temperature: float, side: str = "both") -> torch.Tensor:
    """InfoNCE of the (frozen) teacher image tower against the student text tower.

    ``1/2 [CE(vt ts^T/tau, y) + CE(ts vt^T/tau, y)]``; trains the student text tower only.
    """
    return info_nce(frozen_unit(features.teacher_image), unit(features.student_text), temperature)


@register_term("sdm", kind="task", reads={"both": ("student_image", "student_text")}, needs_pids=True)
def sdm(features: Features, *, temperature: float, side: str = "both", epsilon: float = 1e-8) -> torch.Tensor:
    """IRRA's similarity distribution matching, on the student towers.

    ``q_ij = [pid_i == pid_j] / sum_j [pid_i == pid_j]``;
    ``L = KL(P(vs, ts; tau) || q) + KL(P(ts, vs; tau) || q)`` with ``log(q + epsilon)``.

    IRRA scales the cosines by its logit scale (``1 / 0.02``); here that is ``1 / tau``.
    """
    v, t = unit(features.student_image), unit(features.student_text)
    pids = features.pids.reshape(-1)
    match = (pids[:, None] == pids[None, :]).to(v.dtype)
    log_q = torch.log(match / match.sum(dim=1, keepdim=True) + epsilon)
    return kl(log_p(v, t, temperature), log_q) + kl(log_p(t, v, temperature), log_q)
