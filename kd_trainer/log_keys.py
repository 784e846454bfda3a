"""The names under which training and evaluation values are logged: one definition, written by
the trainers and read back by ``kd_trainer.report``.

A run's ``trainer_state.json`` is read long after the trainer that wrote it, so the trainer and
the report must agree on every key. Both build and parse keys only through this module:

==============================================  ===========================================
``loss_<term>``                                  a loss term, unweighted (single-stage run)
``loss_<term>_weighted``                         the same term times its weight (and alpha)
``<stage>/loss_<term>[_weighted]``               the same in a staged run, under the stage name
``<stage>/<name>``                               any other per-stage value (``image/alpha``)
``mimic/<job>/<teacher>/<loss>``                 a mimic job's loss for one teacher, unweighted
``mimic/<job>/<teacher>/<loss>/<i>``             the same for feature pair ``i`` (``log_pairs``)
``mimic/<job>/weighted``                         the job's weighted value (warm-up x scale)
``mimic/total``                                  the sum of the weighted jobs, added to the loss
``<prefix>_hybrid_<tower>_<metric>``             a hybrid pairing's metric (``eval_`` / ``test_``)
==============================================  ===========================================

Stage names match ``[A-Za-z0-9_-]+`` (the recipe schema), so ``/`` only ever separates parts.

Layer 1: imports nothing from kd_trainer, so every layer may use it.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

__all__ = [
    "LOSS_PREFIX",
    "WEIGHTED_SUFFIX",
    "MIMIC_ROOT",
    "MIMIC_TOTAL_KEY",
    "TermKey",
    "MimicKey",
    "stage_key",
    "term_key",
    "parse_term_key",
    "mimic_key",
    "mimic_weighted_key",
    "parse_mimic_key",
    "hybrid_key",
    "parse_hybrid_key",
]

LOSS_PREFIX = "loss_"
WEIGHTED_SUFFIX = "_weighted"
MIMIC_ROOT = "mimic"
MIMIC_TOTAL_KEY = f"{MIMIC_ROOT}/total"
_SEP = "/"


@dataclass(frozen=True)
class TermKey:
    """A parsed loss-term key: ``image/loss_motis[image]_weighted`` -> ``("motis[image]", True, "image")``."""

    term: str
    weighted: bool
    stage: str | None  # None in a single-stage run


@dataclass(frozen=True)
class MimicKey:
    """A parsed mimic key; ``teacher``/``loss`` are None for ``mimic/<job>/weighted`` and ``job`` too
    for ``mimic/total``."""

    job: str | None
    teacher: str | None = None
    loss: str | None = None
    pair: int | None = None
    weighted: bool = False

    @property
    def is_total(self) -> bool:
        return self.job is None


def stage_key(name: str, stage: str | None) -> str:
    """``name`` as logged in ``stage`` (``"<stage>/<name>"``), or as is when ``stage`` is None."""
    return name if stage is None else f"{stage}{_SEP}{name}"


def term_key(term: str, *, weighted: bool = False, stage: str | None = None) -> str:
    """The log key of loss term ``term``: ``[<stage>/]loss_<term>[_weighted]``.

    ``term`` is the term's key as the recipe names it (``motis[image]``, ``ss_itc``); ``stage``
    is the stage name in a staged run and None in a single-stage one.
    """
    if not term or _SEP in term:
        raise ValueError(f"a loss term key must be non-empty and contain no {_SEP!r}, got {term!r}")
    return stage_key(f"{LOSS_PREFIX}{term}{WEIGHTED_SUFFIX if weighted else ''}", stage)


def parse_term_key(key: str) -> TermKey | None:
    """The term, weighting and stage of a loss-term key; None when ``key`` is not one."""
    if parse_mimic_key(key) is not None:
        return None
    stage, _, last = key.rpartition(_SEP)
    if not last.startswith(LOSS_PREFIX):
        return None
    term = last[len(LOSS_PREFIX):]
    weighted = term.endswith(WEIGHTED_SUFFIX)
    if weighted:
        term = term[: -len(WEIGHTED_SUFFIX)]
    if not term:
        return None
    return TermKey(term=term, weighted=weighted, stage=stage or None)


def mimic_key(job: str, teacher: str, loss: str, pair: int | None = None) -> str:
    """``mimic/<job>/<teacher>/<loss>``, or ``.../<pair>`` for one feature pair's value."""
    for what, v in (("job", job), ("teacher", teacher), ("loss", loss)):
        if not v or _SEP in v:
            raise ValueError(f"a mimic {what} name must be non-empty and contain no {_SEP!r}, got {v!r}")
    key = _SEP.join((MIMIC_ROOT, job, teacher, loss))
    return key if pair is None else f"{key}{_SEP}{int(pair)}"


def mimic_weighted_key(job: str) -> str:
    """``mimic/<job>/weighted``: the job's value after its weight and warm-up."""
    if not job or _SEP in job:
        raise ValueError(f"a mimic job name must be non-empty and contain no {_SEP!r}, got {job!r}")
    return _SEP.join((MIMIC_ROOT, job, "weighted"))


def parse_mimic_key(key: str) -> MimicKey | None:
    """The parts of a mimic key (see the module table); None when ``key`` is not one."""
    parts = key.split(_SEP)
    if parts[0] != MIMIC_ROOT or not all(parts):
        return None
    if len(parts) == 2:
        return MimicKey(job=None, weighted=True) if parts[1] == "total" else None
    if len(parts) == 3:
        return MimicKey(job=parts[1], weighted=True) if parts[2] == "weighted" else None
    if len(parts) == 4:
        return MimicKey(job=parts[1], teacher=parts[2], loss=parts[3])
    if len(parts) == 5 and parts[4].isdigit():
        return MimicKey(job=parts[1], teacher=parts[2], loss=parts[3], pair=int(parts[4]))
    return None


def hybrid_key(tower: str, metric: str, prefix: str = "eval") -> str:
    """``<prefix>_hybrid_<tower>_<metric>``: ``tower`` is the student tower paired with the teacher's other."""
    if not re.fullmatch(r"[A-Za-z0-9]+", tower):
        raise ValueError(f"a hybrid tower name is alphanumeric (image, text), got {tower!r}")
    return f"{prefix}_hybrid_{tower}_{metric}" if prefix else f"hybrid_{tower}_{metric}"


def parse_hybrid_key(key: str, prefix: str = "eval") -> tuple[str, str] | None:
    """``(tower, metric)`` of a hybrid metric key with ``prefix`` (``""``: no prefix); None otherwise."""
    head = f"{prefix}_hybrid_" if prefix else "hybrid_"
    m = re.fullmatch(re.escape(head) + r"([A-Za-z0-9]+)_(.+)", key)
    return (m.group(1), m.group(2)) if m else None
