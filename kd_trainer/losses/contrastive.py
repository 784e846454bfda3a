"""Contrastive distillation terms: each student embedding is trained to pick its own sample's
teacher embedding out of the batch (MoTIS, and CLIP-KD's interactive contrastive loss).

Notation as in ``docs/losses.md``: ``vs, ts`` student image / text, ``vt, tt`` teacher image / text,
all L2-normalised; ``y = arange(B)``; ``T`` the distillation temperature.

Both terms are means over rows (one student query against all teacher keys), so each computes
only ``features.rows`` when given (``local_rows=True``, ``rows.py``).
"""

from __future__ import annotations

import torch

from kd_trainer.losses.notation import ce, frozen_unit, per_side, sim, unit
from kd_trainer.losses.registry import Features, register_term

__all__ = ["motis", "icl"]


@register_term(
    "motis",
    kind="distill",
    sides=("image", "text", "both"),
    reads={"image": ("student_image", "teacher_image"), "text": ("student_text", "teacher_text")},
    direct_compare=True,
    local_rows=True,
)
def motis(features: Features, *, temperature: float, side: str = "both") -> torch.Tensor:
    """MoTIS intra-modal teacher-student contrastive loss.

    image side ``CE(vs vt^T/T, y)``; text side ``CE(ts tt^T/T, y)``; both: their mean.
    """
    r = features.rows
    return per_side(
        side,
        image=lambda: ce(sim(unit(features.student_image), frozen_unit(features.teacher_image), temperature, r), r),
        text=lambda: ce(sim(unit(features.student_text), frozen_unit(features.teacher_text), temperature, r), r),
    )


@register_term(
    "icl",
    kind="distill",
    sides=("image", "text", "both"),
    reads={"image": ("student_image", "teacher_text"), "text": ("student_text", "teacher_image")},
    direct_compare=True,
    local_rows=True,
)
def icl(features: Features, *, temperature: float, side: str = "both") -> torch.Tensor:
    """CLIP-KD interactive contrastive learning: student queries against the teacher's other modality.

    ``1/2 [CE(vs tt^T/tau, y) + CE(ts vt^T/tau, y)]``; side ``image`` is the first CE alone,
    side ``text`` the second (each trains one student tower), ``both`` their mean.
    """
    r = features.rows
    return per_side(
        side,
        image=lambda: ce(sim(unit(features.student_image), frozen_unit(features.teacher_text), temperature, r), r),
        text=lambda: ce(sim(unit(features.student_text), frozen_unit(features.teacher_image), temperature, r), r),
    )
