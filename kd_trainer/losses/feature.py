"""Feature distillation: the student embedding regresses onto the teacher's (CLIP-KD ``fd``)."""

from __future__ import annotations

import torch

from kd_trainer.losses.notation import frozen_unit, mse, per_side, unit
from kd_trainer.losses.registry import Features, register_term

__all__ = ["fd"]


@register_term(
    "fd",
    kind="distill",
    sides=("image", "text", "both"),
    reads={"image": ("student_image", "teacher_image"), "text": ("student_text", "teacher_text")},
    direct_compare=True,
    batch_dependent=False,
)
def fd(features: Features, *, temperature: float, side: str = "both") -> torch.Tensor:
    """CLIP-KD feature distillation on L2-normalised embeddings.

    ``MSE(proj(vs), vt) + MSE(proj(ts), tt)`` (a sum: CLIP-KD weights it 2000); side ``image``
    is the first MSE alone, side ``text`` the second. ``proj`` is applied by the caller when
    the student and teacher widths differ. The temperature is ignored.
    """
    return per_side(
        side,
        image=lambda: mse(unit(features.student_image), frozen_unit(features.teacher_image)),
        text=lambda: mse(unit(features.student_text), frozen_unit(features.teacher_text)),
        both="sum",
    )
