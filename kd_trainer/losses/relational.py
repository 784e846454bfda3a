"""Relational distillation terms: the student matches the teacher's similarity structure.

Two families, both on similarity matrices of the batch:

- distribution matching (``cross_kd``, ``cross_kl``, ``cross_rkl``, ``inter_*_kl``, ``crd``,
  ``affinity``): row-wise softmax distributions compared by (soft) cross-entropy or KL;
- similarity distance (the ``*_sd`` terms, ConaCLIP): MSE between raw cosine matrices.

Notation as in ``docs/losses.md``: ``vs, ts`` student image / text, ``vt, tt`` teacher image / text,
all L2-normalised; ``T`` the distillation temperature; ``P(X, Y; T)`` the row-wise softmax of
``X Y^T / T``.

Every term is a mean over the rows of its matrices (``KL``, ``SCE`` and ``MSE`` average per-row
quantities, and each row of ``P(X, Y; T)`` or ``X Y^T`` reads row ``i`` of ``X`` against all of
``Y``), so each computes only ``features.rows`` when given (``local_rows=True``, ``rows.py``),
for each direction of a two-way term: the rows of ``ts vs^T`` are local texts, those of
``vs ts^T`` local images. No term needs a statistic of the whole batch.
"""

from __future__ import annotations

import torch

from kd_trainer.losses.notation import cos, frozen_unit, kl, log_p, mse, p, per_side, sce, sim, unit
from kd_trainer.losses.registry import Features, register_term

__all__ = [
    "cross_kd",
    "cross_kl",
    "cross_rkl",
    "inter_ts_kl",
    "inter_ss_kl",
    "inter_ts_sym_kl",
    "crd",
    "affinity",
    "intra_ss_sd",
    "intra_ts_sd",
    "intra_ts_sym_sd",
    "inter_ss_sd",
    "inter_ts_sd",
]

_ALL_EMBEDDINGS = ("student_image", "student_text", "teacher_image", "teacher_text")
_SIDES = ("image", "text", "both")


def _four(f: Features) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """``vs, ts, vt, tt``, normalised (teacher detached)."""
    return unit(f.student_image), unit(f.student_text), frozen_unit(f.teacher_image), frozen_unit(f.teacher_text)


# --- distribution matching ---------------------------------------------------------------------


@register_term("cross_kd", kind="distill", reads={"both": _ALL_EMBEDDINGS}, local_rows=True)
def cross_kd(features: Features, *, temperature: float, side: str = "both") -> torch.Tensor:
    """Hinton KD across models, on the inter-modal (S-S vs T-T) distributions.

    ``T^2/2 [SCE(ts vs^T/T, P(tt,vt;T)) + SCE(vs ts^T/T, P(vt,tt;T))]``
    """
    vs, ts, vt, tt = _four(features)
    t, r = temperature, features.rows
    return t**2 / 2 * (sce(sim(ts, vs, t, r), p(tt, vt, t, r), r) + sce(sim(vs, ts, t, r), p(vt, tt, t, r), r))


@register_term("cross_kl", kind="distill", reads={"both": _ALL_EMBEDDINGS}, local_rows=True)
def cross_kl(features: Features, *, temperature: float, side: str = "both") -> torch.Tensor:
    """Forward KL from the teacher's to the student's inter-modal distributions.

    ``T^2/2 [KL(P(tt,vt;T) || P(ts,vs;T)) + KL(P(vt,tt;T) || P(vs,ts;T))]``
    """
    vs, ts, vt, tt = _four(features)
    t, r = temperature, features.rows
    return t**2 / 2 * (
        kl(log_p(tt, vt, t, r), log_p(ts, vs, t, r), r) + kl(log_p(vt, tt, t, r), log_p(vs, ts, t, r), r)
    )


@register_term("cross_rkl", kind="distill", reads={"both": _ALL_EMBEDDINGS}, local_rows=True)
def cross_rkl(features: Features, *, temperature: float, side: str = "both") -> torch.Tensor:
    """Reverse KL: ``cross_kl`` with the KL arguments swapped.

    ``T^2/2 [KL(P(ts,vs;T) || P(tt,vt;T)) + KL(P(vs,ts;T) || P(vt,tt;T))]``
    """
    vs, ts, vt, tt = _four(features)
    t, r = temperature, features.rows
    return t**2 / 2 * (
        kl(log_p(ts, vs, t, r), log_p(tt, vt, t, r), r) + kl(log_p(vs, ts, t, r), log_p(vt, tt, t, r), r)
    )


@register_term(
    "inter_ts_kl",
    kind="distill",
    sides=_SIDES,
    reads={
        "image": ("student_image", "teacher_image", "teacher_text"),
        "text": ("student_text", "teacher_image", "teacher_text"),
    },
    direct_compare=True,
    local_rows=True,
)
def inter_ts_kl(features: Features, *, temperature: float, side: str = "both") -> torch.Tensor:
    """Inter-modal teacher-student KL: student embeddings queried against the teacher's other modality.

    text side ``KL(P(ts,vt;T) || P(tt,vt;T))``; image side ``KL(P(vs,tt;T) || P(vt,tt;T))``;
    both: their mean.

    Fixes a defect of the original code, whose image side took its target from the *student*
    image (``vs tt^T``), so that branch was identically zero. To reproduce the published
    numbers, leave the image side out of the recipe (that is what the original trained).
    """
    t, r = temperature, features.rows
    vt, tt = frozen_unit(features.teacher_image), frozen_unit(features.teacher_text)

    def image() -> torch.Tensor:
        vs = unit(features.student_image)
        return kl(log_p(vs, tt, t, r), log_p(vt, tt, t, r), r)

    def text() -> torch.Tensor:
        ts = unit(features.student_text)
        return kl(log_p(ts, vt, t, r), log_p(tt, vt, t, r), r)

    return per_side(side, image, text)


@register_term("inter_ss_kl", kind="distill", reads={"both": _ALL_EMBEDDINGS}, local_rows=True)
def inter_ss_kl(features: Features, *, temperature: float, side: str = "both") -> torch.Tensor:
    """Inter-modal student-student KL against the teacher's, both directions summed (no ``T^2``).

    ``KL(P(ts,vs;T) || P(tt,vt;T)) + KL(P(vs,ts;T) || P(vt,tt;T))``
    """
    vs, ts, vt, tt = _four(features)
    t, r = temperature, features.rows
    return kl(log_p(ts, vs, t, r), log_p(tt, vt, t, r), r) + kl(log_p(vs, ts, t, r), log_p(vt, tt, t, r), r)


@register_term("inter_ts_sym_kl", kind="distill", reads={"both": _ALL_EMBEDDINGS}, direct_compare=True, local_rows=True)
def inter_ts_sym_kl(features: Features, *, temperature: float, side: str = "both") -> torch.Tensor:
    """Symmetric KL between the two hybrid (teacher-student) inter-modal distributions.

    ``A = P(ts,vt;T)``, ``C = P(vs,tt;T)``: ``KL(A || C) + KL(C || A)``.
    Not zero when the student equals the teacher (``A`` and ``C`` are then the two directions
    of the teacher's own similarity matrix).
    """
    vs, ts, vt, tt = _four(features)
    t, r = temperature, features.rows
    a, c = log_p(ts, vt, t, r), log_p(vs, tt, t, r)
    return kl(a, c, r) + kl(c, a, r)


@register_term("crd", kind="distill", reads={"both": _ALL_EMBEDDINGS}, local_rows=True)
def crd(
    features: Features,
    *,
    temperature: float,
    side: str = "both",
    teacher_temperature: float | None = None,
    directions: str = "mean",
) -> torch.Tensor:
    """CLIP-KD contrastive relational distillation.

    ``1/2 [KL(P(vt,tt;tau_t) || P(vs,ts;tau_s)) + KL(P(tt,vt;tau_t) || P(ts,vs;tau_s))]`` with
    ``tau_s = temperature`` and ``tau_t = teacher_temperature`` (default: ``tau_s``).
    ``directions: sum`` drops the ``1/2``: the seed code's CLIP-KD path adds the image-to-text
    and text-to-image KLs without halving them (``recipes/clip_kd.yaml`` reproduces it so).
    """
    if directions not in ("mean", "sum"):
        raise ValueError(f"crd: directions must be 'mean' (CLIP-KD's 1/2 of the two KLs) or 'sum' (the seed "
                         f"code's), got {directions!r}")
    vs, ts, vt, tt = _four(features)
    tau_s, r = temperature, features.rows
    tau_t = temperature if teacher_temperature is None else float(teacher_temperature)
    image_rows = kl(log_p(vt, tt, tau_t, r), log_p(vs, ts, tau_s, r), r)
    text_rows = kl(log_p(tt, vt, tau_t, r), log_p(ts, vs, tau_s, r), r)
    both = image_rows + text_rows
    return both if directions == "sum" else both / 2


@register_term("affinity", kind="distill", reads={"both": _ALL_EMBEDDINGS}, local_rows=True)
def affinity(features: Features, *, temperature: float, side: str = "both") -> torch.Tensor:
    """TinyCLIP affinity mimicking (``cross_kd`` without the ``T^2``).

    ``1/2 [SCE(vs ts^T/tau, P(vt,tt;tau)) + SCE(ts vs^T/tau, P(tt,vt;tau))]``
    """
    vs, ts, vt, tt = _four(features)
    t, r = temperature, features.rows
    return (sce(sim(vs, ts, t, r), p(vt, tt, t, r), r) + sce(sim(ts, vs, t, r), p(tt, vt, t, r), r)) / 2


# --- similarity distance (ConaCLIP); the temperature is ignored --------------------------------


@register_term(
    "intra_ss_sd",
    kind="distill",
    sides=_SIDES,
    reads={"image": ("student_image", "teacher_image"), "text": ("student_text", "teacher_text")},
    local_rows=True,
)
def intra_ss_sd(features: Features, *, temperature: float, side: str = "both") -> torch.Tensor:
    """Intra-modal student-student similarity distance.

    image ``MSE(vs vs^T, vt vt^T)``; text ``MSE(ts ts^T, tt tt^T)``; both: their mean.
    """
    r = features.rows

    def image() -> torch.Tensor:
        vs, vt = unit(features.student_image), frozen_unit(features.teacher_image)
        return mse(cos(vs, vs, r), cos(vt, vt, r), r)

    def text() -> torch.Tensor:
        ts, tt = unit(features.student_text), frozen_unit(features.teacher_text)
        return mse(cos(ts, ts, r), cos(tt, tt, r), r)

    return per_side(side, image, text)


@register_term(
    "intra_ts_sd",
    kind="distill",
    sides=_SIDES,
    reads={"image": ("student_image", "teacher_image"), "text": ("student_text", "teacher_text")},
    direct_compare=True,
    local_rows=True,
)
def intra_ts_sd(features: Features, *, temperature: float, side: str = "both") -> torch.Tensor:
    """Intra-modal teacher-student similarity distance.

    image ``MSE(vs vt^T, vt vt^T)``; text ``MSE(ts tt^T, tt tt^T)``; both: their mean.
    """
    r = features.rows

    def image() -> torch.Tensor:
        vs, vt = unit(features.student_image), frozen_unit(features.teacher_image)
        return mse(cos(vs, vt, r), cos(vt, vt, r), r)

    def text() -> torch.Tensor:
        ts, tt = unit(features.student_text), frozen_unit(features.teacher_text)
        return mse(cos(ts, tt, r), cos(tt, tt, r), r)

    return per_side(side, image, text)


@register_term("intra_ts_sym_sd", kind="distill", reads={"both": _ALL_EMBEDDINGS}, direct_compare=True, local_rows=True)
def intra_ts_sym_sd(features: Features, *, temperature: float, side: str = "both") -> torch.Tensor:
    """Cross-tower intra-modal teacher-student similarity distance: ``MSE(ts tt^T, vs vt^T)``.

    Not zero when the student equals the teacher (it then compares ``tt tt^T`` with ``vt vt^T``).
    """
    vs, ts, vt, tt = _four(features)
    r = features.rows
    return mse(cos(ts, tt, r), cos(vs, vt, r), r)


@register_term("inter_ss_sd", kind="distill", reads={"both": _ALL_EMBEDDINGS}, local_rows=True)
def inter_ss_sd(features: Features, *, temperature: float, side: str = "both") -> torch.Tensor:
    """Inter-modal student-student similarity distance.

    ``1/2 [MSE(ts vs^T, tt vt^T) + MSE(vs ts^T, vt tt^T)]`` (the two halves are transposes, so
    equal over the whole batch; kept as written in docs/losses.md). With local rows they differ per
    process (local texts' rows, then local images' rows), and each sums to its whole half.
    """
    vs, ts, vt, tt = _four(features)
    r = features.rows
    return (mse(cos(ts, vs, r), cos(tt, vt, r), r) + mse(cos(vs, ts, r), cos(vt, tt, r), r)) / 2


@register_term(
    "inter_ts_sd",
    kind="distill",
    sides=_SIDES,
    reads={
        "image": ("student_image", "teacher_image", "teacher_text"),
        "text": ("student_text", "teacher_image", "teacher_text"),
    },
    direct_compare=True,
    local_rows=True,
)
def inter_ts_sd(features: Features, *, temperature: float, side: str = "both") -> torch.Tensor:
    """Inter-modal teacher-student similarity distance.

    ``1/2 [MSE(ts vt^T, tt vt^T) + MSE(vs tt^T, vt tt^T)]``: side ``text`` is the first MSE
    alone, side ``image`` the second (each trains one student tower), ``both`` their mean.
    """
    vt, tt = frozen_unit(features.teacher_image), frozen_unit(features.teacher_text)
    r = features.rows

    def image() -> torch.Tensor:
        vs = unit(features.student_image)
        return mse(cos(vs, tt, r), cos(vt, tt, r), r)

    def text() -> torch.Tensor:
        ts = unit(features.student_text)
        return mse(cos(ts, vt, r), cos(tt, vt, r), r)

    return per_side(side, image, text)
