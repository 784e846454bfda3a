"""The resolved plan of a run: what every stage does, decided once.

The recipe names things (terms, sides, towers, module prefixes); the plan is those names
looked up and checked once, before training: per stage, the registry spec of each term with
its resolved temperature, weight and group, the student parameters it trains and the towers it
runs without autograd, where the teacher's embeddings come from, and the stage's place on the
step axis. The trainer reads the plan and never looks a name up again; ``kd-trainer plan``
prints it (:meth:`RunPlan.describe`).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any, Sequence

import torch
from torch import nn

from kd_trainer.distill.cache.policy import TeacherSourcePlan, plan_teacher_source
from kd_trainer.losses import Features, TermSpec, get_term
from kd_trainer.losses.registry import TEACHER_EMBEDDINGS
from kd_trainer.models.towers import towers_of, trainable_names
from kd_trainer.recipe import LossConfig, OptimSettings, Recipe, SelectConfig, StageConfig, TermConfig
from kd_trainer.recipe import Trainable
from kd_trainer.recipe.schedules import Clock, ScheduleLike, value_at

logger = logging.getLogger("kd_trainer")


@dataclass(frozen=True)
class PlannedTerm:
    """One loss term as the trainer runs it: its recipe entry resolved against the registry."""

    config: TermConfig
    spec: TermSpec
    temperature: float  # absolute; the term's default when the recipe gives none

    @property
    def key(self) -> str:
        """The log name: ``motis`` or, for one side only, ``motis[image]``."""
        return self.config.key

    @property
    def group(self) -> str:
        """Which side of the alpha mix the term is on (``task`` or ``distill``)."""
        return self.config.group or self.spec.kind

    @property
    def embeddings(self) -> frozenset[str]:
        return self.spec.embeddings(self.config.side)

    def __call__(self, features: Features) -> torch.Tensor:
        return self.spec.fn(features, temperature=self.temperature, side=self.config.side, **self.config.kwargs)


def plan_term(cfg: TermConfig) -> PlannedTerm:
    """Look a recipe term up once; its side, temperature and extra arguments are checked by the
    registry's one rule (``TermSpec.check_use``, which the recipe already ran when it was read)."""
    spec = get_term(cfg.name)  # an UnknownTermError (a ValueError) names the closest terms
    return PlannedTerm(cfg, spec, spec.check_use(cfg.side, cfg.kwargs, cfg.temperature))


def plan_terms(configs: Sequence[TermConfig]) -> tuple[PlannedTerm, ...]:
    return tuple(plan_term(c) for c in configs)


@dataclass
class Stage:
    """One stage as the trainer runs it: its terms, what it trains, and its place on the step axis."""

    index: int  # 0-based
    name: str
    trainable: Trainable
    terms: tuple[PlannedTerm, ...]
    alpha: ScheduleLike | None = None
    epochs: int | None = None
    steps: int | None = None
    learning_rate: float | None = None
    eval_hybrids: list[str] = field(default_factory=list)
    start_step: int = 0
    end_step: int = 0  # exclusive
    # Bound to the student (RunPlan.bind): the parameters this stage trains, and the student
    # towers it runs without autograd because it trains nothing of them.
    params: frozenset[str] = frozenset()
    frozen_towers: tuple[str, ...] = ()
    # The seed code's optimiser and per-epoch schedule (`optim: {preset: irra}`); None: the Trainer's.
    optim: OptimSettings | None = None
    # Where the stage's teacher embeddings come from (RunPlan.place_teacher); None: the online
    # teacher for the terms that read one (a plan built without a teacher cache or mimic jobs).
    teacher_source: TeacherSourcePlan | None = None

    @property
    def num_steps(self) -> int:
        return self.end_step - self.start_step

    @property
    def embeddings(self) -> frozenset[str]:
        """Every embedding (of ``student_image``, ``student_text``, ``teacher_image``, ``teacher_text``)
        some term of this stage reads."""
        return frozenset().union(*(t.embeddings for t in self.terms))

    @property
    def teacher_embeddings(self) -> frozenset[str]:
        return self.embeddings & TEACHER_EMBEDDINGS

    @property
    def batch_dependent(self) -> bool:
        return any(t.spec.batch_dependent for t in self.terms)

    def coefficients(self, clock: Clock) -> tuple[dict[str, float], float | None]:
        """Each term's weight at ``clock`` with the alpha mix applied, and alpha itself (or None)."""
        alpha = value_at(self.alpha, clock) if self.alpha is not None else None
        coefs = {}
        for t in self.terms:
            coef = value_at(t.config.weight, clock)
            if alpha is not None:
                coef *= alpha if t.group == "distill" else 1.0 - alpha
            coefs[t.key] = coef
        return coefs, alpha


class RunPlan:
    """The ordered stages of a run and where each begins and ends, in optimizer steps.

    A run without ``stages:`` is one stage named ``train`` that trains everything for the
    Trainer's own length.
    """

    def __init__(self, stages: Sequence[Stage], select: SelectConfig | None = None):
        if not stages:
            raise ValueError("a run plan needs at least one stage")
        self.stages = list(stages)
        self.steps_per_epoch: int | None = None
        self.select = select  # keep the last stage's best evaluation (None: its last weights)

    @classmethod
    def from_recipe(cls, recipe: Recipe) -> "RunPlan":
        """A retrieval recipe's plan: its stages (or single loss), terms, optimisers and selection."""
        has_teacher = recipe.teacher is not None
        plan = cls.from_configs(recipe.stages, has_teacher=has_teacher) if recipe.stages is not None \
            else cls.single(recipe.loss)
        for stage, cfg in zip(plan.stages, recipe.stages or [None]):
            eff = recipe.stage_optim(cfg)
            stage.optim = None if eff is None or eff.uses_trainer else eff.resolve()
        plan.select = recipe.select
        return plan

    @classmethod
    def from_configs(cls, configs: Sequence[StageConfig], *, has_teacher: bool) -> "RunPlan":
        stages = []
        for i, c in enumerate(configs):
            hybrids = c.eval_hybrids
            if hybrids is None:
                hybrids = [c.trainable] if c.trainable in ("image", "text") and has_teacher else []
            elif hybrids and not has_teacher:
                raise ValueError(f"stage {c.name!r} asks for hybrid evaluation {hybrids}, which needs a teacher")
            stages.append(Stage(i, c.name, c.trainable, plan_terms(c.loss.terms), c.loss.alpha, c.epochs, c.steps,
                                c.learning_rate, list(hybrids)))
        return cls(stages)

    @classmethod
    def single(cls, loss: LossConfig | None) -> "RunPlan":
        """A plain run: one stage that trains everything (no terms: a task loss only)."""
        terms = plan_terms(loss.terms) if loss is not None else ()
        return cls([Stage(0, "train", "all", terms, loss.alpha if loss is not None else None)])

    @property
    def is_single(self) -> bool:
        return len(self.stages) == 1 and self.stages[0].trainable == "all"

    @property
    def terms(self) -> list[PlannedTerm]:
        return [t for s in self.stages for t in s.terms]

    @property
    def teacher_terms(self) -> list[str]:
        """Keys of the terms that read a teacher (the run needs one when this is not empty)."""
        return [t.key for t in self.terms if t.spec.needs_teacher]

    @property
    def wants_teacher(self) -> bool:
        """A teacher model is used: by a term, or by a stage's hybrid evaluation."""
        return bool(self.teacher_terms) or any(s.eval_hybrids for s in self.stages)

    @property
    def direct_compare(self) -> bool:
        """Some term compares student and teacher embeddings directly (projections when widths differ)."""
        return any(t.spec.direct_compare for t in self.terms)

    @property
    def uses_stage_optimizer(self) -> bool:
        """Our own optimizer per stage: several stages, a partial trainable set, a stage LR, or an
        ``optim:`` preset (a single stage keeps the Trainer's otherwise)."""
        first = self.stages[0]
        return not self.is_single or first.learning_rate is not None or first.optim is not None

    def place_teacher(self, *, cache: bool, live: bool) -> "RunPlan":
        """Decide each stage's teacher source once: the cache for the terms it can serve when the
        run opens one (``cache``), the online teacher otherwise, and always the online teacher
        when mimic jobs read its layers (``live``). The runner logs each (``teacher_source.log()``)."""
        for s in self.stages:
            s.teacher_source = plan_teacher_source(s.terms, cache_available=cache, stage=s.name, for_mimic=live,
                                                   log=None)
        return self

    def bind(self, model: nn.Module, *, always: tuple[str, ...] = ()) -> "RunPlan":
        """Resolve each stage's trainable parameters and frozen towers on the student ``model``;
        parameters under the ``always`` prefixes (the mimic adapters) train in every stage."""
        extra = frozenset(n for n, _ in model.named_parameters() if always and n.startswith(always))
        for s in self.stages:
            names = frozenset(trainable_names(model, s.trainable))
            s.params, s.frozen_towers = names | extra, tuple(sorted({"image", "text"} - towers_of(names)))
        return self

    @property
    def total_steps(self) -> int:
        return self.stages[-1].end_step

    def resolve(self, steps_per_epoch: int, default_steps: int | None = None) -> int:
        """Place the stages on the step axis; returns the run's total optimizer steps.

        A stage in epochs lasts ``epochs * steps_per_epoch`` steps, so epoch-long stages end on
        epoch boundaries. ``default_steps`` is the length of a stage that sets none (single runs).
        """
        self.steps_per_epoch = steps_per_epoch
        start = 0
        for s in self.stages:
            if s.steps is not None:
                n = s.steps
            elif s.epochs is not None:
                n = s.epochs * steps_per_epoch
            elif default_steps is not None:
                n = default_steps
            else:
                raise ValueError(f"stage {s.name!r} has no length")
            s.start_step, s.end_step = start, start + n
            start += n
        return start

    def stage_at(self, global_step: int) -> Stage:
        """The stage that takes optimizer step number ``global_step`` (completed steps so far)."""
        for s in self.stages:
            if global_step < s.end_step:
                return s
        return self.stages[-1]

    def stage_done_at(self, global_step: int) -> Stage:
        """The stage whose weights a model has after ``global_step`` steps (what evaluation sees)."""
        return self.stage_at(max(global_step - 1, 0))

    def clock(self, global_step: int) -> Clock:
        stage = self.stage_at(global_step)
        per_epoch = self.steps_per_epoch or 1
        in_stage = global_step - stage.start_step
        return Clock(step=global_step, epoch=global_step // per_epoch,
                     stage_step=in_stage, stage_epoch=in_stage // per_epoch)

    def to_json(self) -> dict[str, Any]:
        return {
            "steps_per_epoch": self.steps_per_epoch,
            "stages": [{"index": s.index + 1, "name": s.name, "start_step": s.start_step, "end_step": s.end_step,
                        "trainable": s.trainable, "epochs": s.epochs, "steps": s.num_steps,
                        "eval_hybrids": s.eval_hybrids} for s in self.stages],
        }

    def describe(self) -> list[str]:
        """Human-readable lines: per stage, its length, what trains, and every term."""
        lines = []
        for s in self.stages:
            length = f"{s.epochs} epochs" if s.epochs is not None else (f"{s.steps} steps" if s.steps else "the run")
            lines.append(f"stage {s.index + 1}/{len(self.stages)} {s.name!r}: {length}, trains {s.trainable}"
                         + (f" ({len(s.params)} tensors)" if s.params else "")
                         + (f", no autograd in {', '.join(s.frozen_towers)} tower" if s.frozen_towers else ""))
            if s.alpha is not None:
                lines.append(f"  alpha: {_describe_schedule(s.alpha)}")
            for t in s.terms:
                lines.append(f"  term {t.key:<22} group {t.group:<8} temperature {t.temperature:<6g} "
                             f"weight {_describe_schedule(t.config.weight)}"
                             + (f" kwargs {t.config.kwargs}" if t.config.kwargs else ""))
            if s.eval_hybrids:
                lines.append(f"  hybrid evaluation: {', '.join(s.eval_hybrids)}")
        return lines


def _describe_schedule(value: ScheduleLike) -> str:
    if isinstance(value, (int, float)):
        return f"{value:g}"
    return ", ".join(f"{k}={v}" for k, v in value.model_dump().items())

