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
    local_rows=True,
)
def fd(features: Features, *, temperature: float, side: str = "both") -> torch.Tensor:
    """CLIP-KD feature distillation on L2-normalised embeddings.

    ``MSE(proj(vs), vt) + MSE(proj(ts), tt)`` (a sum: CLIP-KD weights it 2000); side ``image``
    is the first MSE alone, side ``text`` the second. ``proj`` is applied by the caller when
    the student and teacher widths differ. The temperature is ignored.

    Per-sample, so it needs no other process's samples; but given a gathered batch with
    ``features.rows`` it computes its own rows' share (``rows.py``), which stays exact when
    processes hold different numbers of samples (a local mean averaged by DDP does not).
    """
    r = features.rows

    def own(x: torch.Tensor) -> torch.Tensor:
        return x if r is None else r.of(x)

    return per_side(
        side,
        image=lambda: mse(unit(own(features.student_image)), frozen_unit(own(features.teacher_image)), r),
        text=lambda: mse(unit(own(features.student_text)), frozen_unit(own(features.teacher_text)), r),
        both="sum",
    )
