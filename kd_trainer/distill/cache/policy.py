"""Which terms may read the teacher cache, and so where each stage's teacher embeddings come from.

A cache holds the teacher's final embeddings only. A stage whose teacher terms all read just
those takes them from the cache (no teacher forward); a stage with any term that needs more
(intermediate teacher outputs) runs the online teacher, and the decision is logged once.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from kd_trainer.losses.registry import STUDENT_EMBEDDINGS, TEACHER_EMBEDDINGS, TermSpec, get_term

__all__ = ["CACHEABLE_EMBEDDINGS", "TeacherSourcePlan", "plan_teacher_source", "term_uses_cache"]

logger = logging.getLogger("kd_trainer")

# The teacher outputs a cache holds. A term reading anything else (e.g. a mimic term on patch
# tokens or attention maps) needs the online teacher.
CACHEABLE_EMBEDDINGS = frozenset({"teacher_image", "teacher_text"})


def term_uses_cache(term: TermSpec | str, side: str = "both") -> bool:
    """True when ``term`` (a spec, or a name to look up) reads, for ``side``, only teacher
    outputs the cache holds.

    Every term of :mod:`kd_trainer.losses` reads only final embeddings, so all qualify. A term
    reading other teacher outputs (an embedding outside ``CACHEABLE_EMBEDDINGS``) would not. Mimic jobs
    on the main teacher read its hooked layers and always run it live (``RetrievalTrainer``).
    """
    spec = get_term(term) if isinstance(term, str) else term
    return spec.embeddings(side) - STUDENT_EMBEDDINGS <= CACHEABLE_EMBEDDINGS


@dataclass(frozen=True)
class TeacherSourcePlan:
    """Where one stage's teacher embeddings come from.

    ``use_cache``: ``TeacherCache.lookup`` replaces the teacher forward. When any teacher term
    needs the online teacher, the whole stage uses it (its forward yields the final embeddings
    anyway, and from the replayed images they equal the cached ones). ``for_mimic``: mimic jobs
    read the teacher's hooked layers, so it runs both towers live (under ``no_grad``, so the
    hooked features stay ordinary tensors) in every stage.
    """

    cached_terms: tuple[str, ...]
    online_terms: tuple[str, ...]
    use_cache: bool
    needs_teacher_model: bool
    message: str
    for_mimic: bool = False
    fallback: bool = False  # a cache is there but this stage cannot use it (said as a warning)

    def log(self, log: logging.Logger = logger) -> None:
        """One line saying where the stage's teacher embeddings come from."""
        (log.warning if self.fallback else log.info)("teacher source: %s", self.message)


def _label_spec_side(term: Any) -> tuple[str, TermSpec, str]:
    """(label, spec, side) of a planned term (its spec already looked up, so it is not looked up
    again), a ``TermConfig`` or a ``(name, side)`` pair."""
    cfg = getattr(term, "config", term)
    if isinstance(cfg, (tuple, list)):
        name, side = cfg
        label = name if side == "both" else f"{name}[{side}]"  # as TermConfig.key
    else:
        name, side, label = cfg.name, cfg.side, getattr(cfg, "key", cfg.name)
    spec = getattr(term, "spec", None)
    return label, spec if spec is not None else get_term(name), side


def plan_teacher_source(terms: Iterable[Any], *, cache_available: bool, stage: str = "", for_mimic: bool = False,
                        log: logging.Logger | None = logger) -> TeacherSourcePlan:
    """Decide cache vs online teacher for one stage's terms, and log one line saying which.

    ``terms``: the stage's planned terms (anything with ``.config`` and ``.spec``, as
    :class:`kd_trainer.distill.plan.PlannedTerm`), ``TermConfig``s, or ``(name, side)`` pairs.
    ``for_mimic``: mimic jobs read the teacher's layers, so it runs live whatever the terms read.
    """
    teacher_terms = [_label_spec_side(t) for t in terms]
    teacher_terms = [t for t in teacher_terms if t[1].embeddings(t[2]) & TEACHER_EMBEDDINGS]
    cached = tuple(label for label, spec, s in teacher_terms
                   if cache_available and not for_mimic and term_uses_cache(spec, s))
    online = tuple(label for label, _, _ in teacher_terms if label not in cached)
    where = f"stage {stage!r}: " if stage else ""
    if for_mimic:
        plan = TeacherSourcePlan((), online, False, True,
                                 f"{where}mimic jobs read the teacher's layers: online teacher (both towers)"
                                 + (", cache unused" if cache_available else ""), for_mimic=True)
    elif not teacher_terms:
        plan = TeacherSourcePlan((), (), False, False, f"{where}no term reads the teacher")
    elif not online:
        plan = TeacherSourcePlan(cached, (), True, False,
                                 f"{where}teacher embeddings from the cache for {list(cached)} (no teacher forward)")
    elif not cache_available:
        plan = TeacherSourcePlan((), online, False, True, f"{where}no teacher cache: online teacher for {list(online)}")
    else:
        plan = TeacherSourcePlan((), online + cached, False, True,
                                 f"{where}terms {list(online)} read teacher outputs the cache does not hold "
                                 f"(only final embeddings are cached): falling back to the online teacher for "
                                 f"this stage, cache unused", fallback=True)
    if log is not None:
        plan.log(log)
    return plan
