"""The registry of loss terms: every term of ``docs/losses.md`` under the name users type.

A term is a pure function ``fn(features, *, temperature, side, **kwargs) -> scalar`` registered
with :func:`register_term`, which also records what the trainer needs to know about it: which
of a batch's four embeddings (:class:`Features`: ``student_image``, ``student_text``,
``teacher_image``, ``teacher_text``) it reads for each side, and so which student towers it
trains; whether it needs a teacher, and whether it compares student and teacher embeddings
directly (and so needs a projection when widths differ), and whether it computes only a
process's own rows of a gathered batch (``local_rows``, see ``rows.py``).

"Embeddings" names those four matrices; "towers" are a model's image and text encoders
(:mod:`kd_trainer.models.towers`).
"""

from __future__ import annotations

import difflib
import inspect
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType

import torch

from kd_trainer.losses.rows import LocalRows

__all__ = [
    "Features",
    "LocalRows",
    "TermSpec",
    "UnknownTermError",
    "register_term",
    "get_term",
    "available_terms",
    "compute_term",
    "TERMS",
    "STUDENT_EMBEDDINGS",
    "TEACHER_EMBEDDINGS",
    "SIDES",
    "KINDS",
]

STUDENT_EMBEDDINGS = frozenset({"student_image", "student_text"})
TEACHER_EMBEDDINGS = frozenset({"teacher_image", "teacher_text"})
SIDES = ("image", "text", "both")
KINDS = ("task", "distill")
# docs/losses.md: task temperature 0.02 (--temperature), distillation temperatures 0.5.
DEFAULT_TEMPERATURE = {"task": 0.02, "distill": 0.5}


@dataclass
class Features:
    """Embeddings of one batch. Row i of each is sample i; positives on the diagonal.

    ``rows``: the rows this process computes when the batch was gathered from several processes
    (set by ``gather_features``); terms whose spec says ``local_rows`` compute only those rows
    against all columns. ``None``: every row.
    """

    student_image: torch.Tensor | None = None  # vs, B x Ds
    student_text: torch.Tensor | None = None  # ts, B x Ds
    teacher_image: torch.Tensor | None = None  # vt, B x Dt
    teacher_text: torch.Tensor | None = None  # tt, B x Dt
    pids: torch.Tensor | None = None  # B, int64 (sdm needs it)
    rows: LocalRows | None = None


@dataclass(frozen=True)
class TermSpec:
    """A registered term and what the trainer needs to know to run it.

    ``reads`` maps each allowed side to the embeddings the term reads for it (of the four
    :class:`Features` fields ``student_image``, ``student_text``, ``teacher_image``,
    ``teacher_text``); :meth:`embeddings` and :meth:`trains` answer from it (every student
    embedding a term reads sends gradient into its tower; teacher embeddings are detached inside
    every term).
    """

    name: str
    fn: Callable[..., torch.Tensor]
    kind: str
    sides: tuple[str, ...]
    default_temperature: float
    needs_teacher: bool
    direct_compare: bool
    batch_dependent: bool
    reads: Mapping[str, frozenset[str]] = field(hash=False)
    needs_pids: bool = False
    local_rows: bool = False

    def _check_side(self, side: str) -> None:
        if side not in self.sides:
            raise ValueError(
                f"loss term {self.name!r} has no side {side!r}; allowed sides: {', '.join(self.sides)}"
            )

    def check_use(self, side: str, kwargs: Mapping[str, object], temperature: float | None = None) -> float:
        """The one check of a use of this term (a recipe entry, a plan, a direct call): its side, its
        temperature and its extra arguments. Returns the absolute temperature (the default for None)."""
        self._check_side(side)
        tau = self.default_temperature if temperature is None else float(temperature)
        if not tau > 0:
            raise ValueError(f"loss term {self.name!r}: temperature must be positive, got {temperature}")
        allowed = _extra_parameters(self.fn)
        if allowed is not None and set(kwargs) - allowed:
            raise ValueError(f"loss term {self.name!r} got unexpected arguments {sorted(set(kwargs) - allowed)}; "
                             f"it accepts {sorted(allowed) if allowed else 'no extra arguments'}")
        return tau

    def embeddings(self, side: str) -> frozenset[str]:
        """The embeddings (of ``student_image``, ``student_text``, ``teacher_image``,
        ``teacher_text``) this term reads when called with ``side``."""
        self._check_side(side)
        return self.reads[side]

    def trains(self, side: str) -> frozenset[str]:
        """The student embeddings (``student_image``, ``student_text``) that receive gradient from
        this term for ``side``: the towers that compute them are the ones it trains."""
        return self.embeddings(side) & STUDENT_EMBEDDINGS


class UnknownTermError(KeyError, ValueError):
    """An unknown term name. A ``KeyError`` for lookups, a ``ValueError`` for validators."""

    def __str__(self) -> str:  # KeyError would print the message in quotes
        return str(self.args[0])


_REGISTRY: dict[str, TermSpec] = {}
TERMS: Mapping[str, TermSpec] = MappingProxyType(_REGISTRY)
"""Read-only view of every registered term, by name."""


def register_term(
    name: str,
    *,
    kind: str,
    reads: Mapping[str, Iterable[str]],
    sides: tuple[str, ...] = ("both",),
    default_temperature: float | None = None,
    needs_teacher: bool | None = None,
    direct_compare: bool = False,
    batch_dependent: bool = True,
    needs_pids: bool = False,
    local_rows: bool = False,
) -> Callable[[Callable[..., torch.Tensor]], Callable[..., torch.Tensor]]:
    """Register the decorated function as loss term ``name``; returns the function unchanged.

    Args:
        name: The name recipes use. Stack two decorators to register an alias.
        kind: ``"task"`` or ``"distill"``.
        reads: For each side, the embeddings the term reads. ``"both"`` may be left out when
            ``"image"`` and ``"text"`` are given: it is then their union.
        sides: The values of ``side`` the term accepts.
        default_temperature: Used when a recipe gives none; by default 0.02 for task terms
            and 0.5 for distillation terms (docs/losses.md).
        needs_teacher: Defaults to whether any side reads a teacher embedding (and must agree).
        direct_compare: The term compares student with teacher embeddings directly, so a
            student narrower or wider than the teacher needs a projection.
        batch_dependent: A sample's loss depends on the other samples of the batch.
        needs_pids: The term reads ``features.pids``.
        local_rows: Given ``features.rows``, the term computes only those rows against all
            columns and returns their share of the global mean times the number of processes
            (``rows.py``); with ``False`` it ignores ``features.rows`` and computes every row on
            every process (still exact after ``gather_features``, only repeated): the choice of
            a term that needs a statistic of the whole batch beyond its columns.
            ``tests/test_gather.py`` proves every registered term: N processes with local rows
            give the loss and gradients of 1 process on the whole batch.
    """
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}, not {kind!r}")
    bad_sides = [s for s in sides if s not in SIDES]
    if not sides or bad_sides:
        raise ValueError(f"term {name!r}: sides must be a non-empty subset of {SIDES}, got {sides}")
    table = {side: frozenset(names) for side, names in reads.items()}
    if "both" in sides and "both" not in table and {"image", "text"} <= table.keys():
        table["both"] = table["image"] | table["text"]
    for side in sides:
        if side not in table:
            raise ValueError(f"term {name!r}: no embeddings given for side {side!r}")
        unknown = table[side] - STUDENT_EMBEDDINGS - TEACHER_EMBEDDINGS
        if unknown:
            raise ValueError(f"term {name!r}: unknown embeddings {sorted(unknown)}; the embeddings are "
                             f"{sorted(STUDENT_EMBEDDINGS | TEACHER_EMBEDDINGS)}")
    reads_teacher = any(table[s] & TEACHER_EMBEDDINGS for s in sides)
    if needs_teacher is None:
        needs_teacher = reads_teacher
    elif needs_teacher != reads_teacher:
        raise ValueError(f"term {name!r}: needs_teacher={needs_teacher} but its embeddings say {reads_teacher}")

    def decorator(fn: Callable[..., torch.Tensor]) -> Callable[..., torch.Tensor]:
        if name in _REGISTRY:
            raise ValueError(f"loss term {name!r} is already registered")
        _REGISTRY[name] = TermSpec(
            name=name,
            fn=fn,
            kind=kind,
            sides=tuple(sides),
            default_temperature=float(
                DEFAULT_TEMPERATURE[kind] if default_temperature is None else default_temperature
            ),
            needs_teacher=needs_teacher,
            direct_compare=direct_compare,
            batch_dependent=batch_dependent,
            reads=MappingProxyType({s: table[s] for s in sides}),
            needs_pids=needs_pids,
            local_rows=local_rows,
        )
        return fn

    return decorator


def available_terms(kind: str | None = None) -> list[str]:
    """Sorted names of the registered terms, optionally only those of one kind."""
    if kind is not None and kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS} or None, not {kind!r}")
    return sorted(n for n, spec in _REGISTRY.items() if kind is None or spec.kind == kind)


def get_term(name: str) -> TermSpec:
    """The spec of term ``name``; an unknown name raises :class:`UnknownTermError` listing all."""
    try:
        return _REGISTRY[name]
    except KeyError:
        pass
    names = available_terms()
    close = difflib.get_close_matches(str(name).lower(), names, n=1, cutoff=0.5)
    hint = f"; did you mean {close[0]!r}?" if close else ""
    raise UnknownTermError(f"unknown loss term {name!r}{hint} Valid terms: {', '.join(names)}")


def _extra_parameters(fn: Callable[..., torch.Tensor]) -> set[str] | None:
    """Keyword arguments ``fn`` takes beyond the common ones; ``None`` if it takes any."""
    params = inspect.signature(fn).parameters.values()
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params):
        return None
    return {p.name for p in params} - {"features", "temperature", "side"}


def _check_features(spec: TermSpec, side: str, features: Features) -> None:
    names = sorted(spec.embeddings(side))
    missing = [t for t in names if getattr(features, t) is None]
    if missing:
        raise ValueError(
            f"term {spec.name!r} (side={side}) needs {' and '.join(missing)} embeddings, "
            f"but the features have none"
        )
    if spec.needs_pids and features.pids is None:
        raise ValueError(f"term {spec.name!r} (side={side}) needs pids, but the features have none")
    shapes = {t: tuple(getattr(features, t).shape) for t in names}
    if any(len(s) != 2 for s in shapes.values()):
        raise ValueError(f"term {spec.name!r}: embeddings must be B x D matrices, got {shapes}")
    if len({s[0] for s in shapes.values()}) > 1:
        raise ValueError(f"term {spec.name!r}: embeddings of different batch sizes: {shapes}")
    if spec.needs_pids and features.pids.numel() != next(iter(shapes.values()))[0]:
        raise ValueError(f"term {spec.name!r}: {features.pids.numel()} pids for a batch of {shapes}")
    rows = features.rows
    if rows is not None and shapes and rows.total != next(iter(shapes.values()))[0]:
        raise ValueError(
            f"term {spec.name!r}: features.rows is {rows} (rows of a batch of {rows.total}), but the "
            f"embeddings hold {next(iter(shapes.values()))[0]} samples: {shapes}"
        )
    groups = [names] if spec.direct_compare else [
        [t for t in names if t in STUDENT_EMBEDDINGS], [t for t in names if t in TEACHER_EMBEDDINGS]
    ]
    for group in groups:
        if len({shapes[t][1] for t in group}) > 1:
            hint = " (project the student embeddings to the teacher's width)" if spec.direct_compare else ""
            raise ValueError(
                f"term {spec.name!r} (side={side}) compares embeddings of different widths: "
                f"{ {t: shapes[t][1] for t in group} }{hint}"
            )


def compute_term(
    name: str,
    features: Features,
    *,
    temperature: float | None = None,
    side: str = "both",
    **kwargs: object,
) -> torch.Tensor:
    """Compute term ``name`` on ``features`` after checking the side, features and arguments.

    ``temperature`` is absolute (logits = cosine / temperature); ``None`` uses the term's
    default. Extra keyword arguments go to the term (e.g. ``teacher_temperature`` of ``crd``).
    """
    spec = get_term(name)
    tau = spec.check_use(side, kwargs, temperature)
    _check_features(spec, side, features)
    return spec.fn(features, temperature=tau, side=side, **kwargs)
