"""The recipe's ``mimic:`` block (UP/EOD's mimic config), parsed once into a typed :class:`MimicConfig`.

A *job* distils named tapped outputs (``mimic_name``, see :mod:`kd_trainer.models.taps`) of one
or more teachers into the student with one loss (:mod:`kd_trainer.losses.mimic`), a weight and
a warm-up. The block is read in any of its shapes, and every later step reads the typed config:

- UP's single job: ``{loss_weight, warm_up_iters, cfgs: {loss: {type, kwargs}}, teacher0:
  {teacher_weight?, mimic_name: [...]}, student: {mimic_name: [...]}}``;
- UP's several jobs: ``{mimic_as_jobs: True, mimic_job0: {...}, mimic_job1: {...}}``;
- our field names, a list of jobs: ``[{name, loss: {type, kwargs}, teachers: {t: [...]},
  student: [...], ...}, ...]``, or ``{jobs: [...], task_loss: ...}`` (what a saved recipe holds).

UP's keys beside the jobs: ``task_loss`` (False: train on the mimic losses alone) and, per
teacher, ``teacher_weight``: the *path of that teacher's checkpoint* (seed 002: "path of teacher
model"), not a loss multiplier; :func:`resolve_mimic_teachers` makes it the teacher's
``checkpoint``. A job's weight is UP's ``loss_weight * min(1, step / warm_up_iters)`` on the
run's global step, which is the recipe's :class:`~kd_trainer.recipe.schedules.Warmup` schedule
(:attr:`MimicJob.weight_schedule`), so there is one warm-up implementation.

Every error names the key a user wrote, e.g. ``mimic.mimic_job1.teacher1.mimic_name``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, Literal, Protocol

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from kd_trainer.losses.mimic import BuiltLoss, build_loss, canonical_loss_name
from kd_trainer.models.taps import parse_tap_name
from kd_trainer.recipe.schedules import Clock, Constant, Warmup

__all__ = [
    "AdapterMode",
    "MimicLossConfig",
    "MimicJob",
    "MimicConfig",
    "check_exact_accumulation",
    "parse_mimic_config",
    "resolve_mimic_teachers",
]

AdapterMode = Literal["auto", "none", "linear", "conv1x1"]


class MimicLossConfig(BaseModel):
    """UP's ``cfgs.loss``: a registered mimic loss name (ours or UP's) and its kwargs."""

    model_config = ConfigDict(extra="forbid")

    type: str = Field(description="loss name: l2, l1, smooth_l1, cosine, kl, kd, ce, kld, or UP's l2_loss, ...")
    kwargs: dict[str, Any] = Field(default_factory=dict, description="keyword arguments of the loss")

    @model_validator(mode="after")
    def _buildable(self) -> MimicLossConfig:
        build_loss(self.type, self.kwargs)  # unknown names/kwargs fail at config time
        return self

    @property
    def name(self) -> str:
        """Our name for the loss (``l2_loss`` -> ``l2``): the last part of its log key."""
        return canonical_loss_name(self.type)

    def build(self) -> BuiltLoss:
        """The loss bound to its kwargs (UP's ``kwargs.loss_weight`` split off as ``scale``)."""
        return build_loss(self.type, self.kwargs)


def _log_key_part(value: str, what: str) -> None:
    if not value or "/" in value:
        raise ValueError(f"{what} {value!r} must be non-empty and contain no '/': it is part of the log keys")


class MimicJob(BaseModel):
    """One mimic job: UP's ``mimic`` (or ``mimic_jobN``) block in our field names."""

    model_config = ConfigDict(extra="forbid")

    name: str = Field("mimic_job0", description="job name; the second part of every log key")
    loss: MimicLossConfig = Field(description="the loss between paired tapped outputs (UP: cfgs.loss)")
    loss_weight: float = Field(1.0, ge=0, description="job weight after warm-up")
    warm_up_iters: int = Field(-1, ge=-1, description="linear ramp length in global steps; -1 or 0: none")
    teachers: dict[str, list[str]] = Field(
        min_length=1, description="teacher name -> tap names, paired in order with `student`")
    student: list[str] = Field(min_length=1, description="student tap names")
    reduce: Literal["sum", "mean"] = Field("sum", description="how teachers combine: sum (UP) or mean")
    adapter: AdapterMode = Field(
        "auto", description="auto: linear (tokens) / 1x1 conv (maps) only where widths differ; "
                            "linear/conv1x1: always; none: shapes must match")
    teacher_checkpoints: dict[str, str] = Field(
        default_factory=dict, description="UP's teacher_weight: the checkpoint path of a teacher")

    @field_validator("teachers", "student", mode="before")
    @classmethod
    def _str_to_list(cls, v: Any) -> Any:
        if isinstance(v, str):
            return [v]
        if isinstance(v, Mapping):
            return {k: [x] if isinstance(x, str) else x for k, x in v.items()}
        return v

    @model_validator(mode="after")
    def _paired(self) -> MimicJob:
        _log_key_part(self.name, "job name")
        for t in self.teachers:
            _log_key_part(t, "teacher name")
        for name in (*self.student, *(n for names in self.teachers.values() for n in names)):
            parse_tap_name(name)
        for t, names in self.teachers.items():
            if len(names) != len(self.student):
                raise ValueError(f"teacher {t!r} has {len(names)} tap names but the student has "
                                 f"{len(self.student)}; they are paired in order")
        extra = set(self.teacher_checkpoints) - set(self.teachers)
        if extra:
            raise ValueError(f"teacher_checkpoints names teachers {sorted(extra)} that are not in `teachers`")
        return self

    @property
    def weight_schedule(self) -> Constant | Warmup:
        """The job weight as a recipe schedule: UP's ``loss_weight * min(1, step / warm_up_iters)``
        on the run's global step (a resumed run continues the ramp), or a constant when
        ``warm_up_iters <= 0``. UP's loss scale (``cfgs.loss.kwargs.loss_weight``) is not in it."""
        if self.warm_up_iters <= 0:
            return Constant(value=self.loss_weight)
        return Warmup(value=self.loss_weight, steps=self.warm_up_iters, clock="run")

    def weight(self, step: int) -> float:
        """The job weight at global ``step`` (warm-up ramp included, loss scale excluded)."""
        return self.weight_schedule(Clock(step=step))


class MimicConfig(BaseModel):
    """A parsed ``mimic:`` block: its jobs, and UP's ``task_loss``."""

    model_config = ConfigDict(extra="forbid")

    jobs: list[MimicJob] = Field(min_length=1, description="the mimic jobs, in order")
    task_loss: bool = Field(True, description="UP's task_loss: false trains on the mimic losses alone")

    @model_validator(mode="after")
    def _consistent(self) -> MimicConfig:
        seen: set[str] = set()
        where: dict[str, tuple[str, str]] = {}  # teacher -> (checkpoint, job that gave it)
        for job in self.jobs:
            if job.name in seen:
                raise ValueError(f"job name {job.name!r} appears twice")
            seen.add(job.name)
            for t, path in job.teacher_checkpoints.items():
                first, first_job = where.setdefault(t, (path, job.name))
                if first != path:
                    raise ValueError(f"{job.name}.{t}.teacher_weight {path!r} differs from {first!r} given in "
                                     f"{first_job} for the same teacher; a teacher has one checkpoint")
        return self

    @classmethod
    def from_jobs(cls, jobs: Sequence[MimicJob], task_loss: bool = True) -> MimicConfig:
        """Jobs built in code (tests, other tasks), checked as a parsed block is."""
        try:
            return cls(jobs=list(jobs), task_loss=task_loss)
        except ValidationError as e:
            raise _named_error(e, "mimic", {"jobs": "mimic"}) from None

    @property
    def teachers(self) -> list[str]:
        """Every teacher some job reads, in order of first use."""
        return list(dict.fromkeys(t for job in self.jobs for t in job.teachers))

    @property
    def teacher_checkpoints(self) -> dict[str, str]:
        """UP's ``teacher_weight`` of each teacher that has one: the path of its checkpoint."""
        return {t: p for job in self.jobs for t, p in job.teacher_checkpoints.items()}


def check_exact_accumulation(jobs: Sequence[MimicJob]) -> None:
    """Exact accumulation (the gradient cache) keeps only each micro-batch's final embeddings, and
    mimic jobs compare intermediate features: the two cannot be combined. The one place of this
    rule; the recipe and the exact-accumulation trainer both call it."""
    if jobs:
        raise ValueError("contrastive_accumulation: exact cannot be combined with mimic jobs: they compare "
                         "intermediate features, which the gradient cache does not keep (only final "
                         "embeddings). Use contrastive_accumulation: plain, or a per-device batch that fits "
                         "without accumulation")


class _Checkpointed(Protocol):
    checkpoint: str | None


def resolve_mimic_teachers(config: MimicConfig, teachers: Mapping[str, _Checkpointed]) -> None:
    """Check the jobs' teachers against the recipe's and apply UP's ``teacher_weight``.

    ``teachers``: the recipe's model configs by the names jobs use (``teachers:`` entries, and
    ``teacher:`` as ``"teacher"``). A job naming an undefined teacher is refused. A
    ``teacher_weight`` becomes that teacher's ``checkpoint`` when the recipe gives none, so the
    one place that loads teachers loads it; a different ``checkpoint`` given in both places is
    refused rather than one of them silently winning.
    """
    missing = [t for t in config.teachers if t not in teachers]
    if missing:
        raise ValueError(f"mimic jobs name teachers {sorted(missing)}, but the recipe defines "
                         f"{sorted(teachers) or 'none'} (under `teachers:`, or `teacher:` as 'teacher')")
    for name, path in config.teacher_checkpoints.items():
        model = teachers[name]
        if model.checkpoint is None:
            model.checkpoint = path
        elif model.checkpoint != path:
            raise ValueError(f"teacher {name!r}: mimic teacher_weight {path!r} and the recipe's checkpoint "
                             f"{model.checkpoint!r} differ; give the checkpoint in one place")


# --------------------------------------------------------------------------- parsing


_UP_JOB_KEYS = {"mimic_ins_type", "loss_weight", "warm_up_iters", "cfgs", "student", "reduce", "adapter"}
_UP_TEACHER_KEYS = {"mimic_name", "teacher_weight", "teacher_bn_mode"}
_UP_DEFAULT_LOSS = {"type": "l2_loss", "kwargs": {}}  # UP's base mimicker when cfgs.loss is absent


def _named_error(err: ValidationError, where: str, keymap: Mapping[str, str]) -> ValueError:
    lines = []
    for e in err.errors():
        loc = [str(p) for p in e["loc"]]
        head = keymap.get(loc[0], f"{where}.{loc[0]}") if loc else where
        key = ".".join([head, *loc[1:]])
        msg = e["msg"].removeprefix("Value error, ")
        lines.append(f"{key}: {msg}")
    return ValueError("; ".join(lines))


def _names(v: Any, key: str) -> list[str]:
    if isinstance(v, str):
        return [v]
    if not isinstance(v, (list, tuple)) or not all(isinstance(x, str) for x in v):
        raise ValueError(f"{key} must be a list of module names, got {v!r}")
    return list(v)


def _up_job(name: str, block: Any, where: str) -> MimicJob:
    if not isinstance(block, Mapping):
        raise ValueError(f"{where} must be a mapping, got {type(block).__name__}")
    teachers: dict[str, list[str]] = {}
    checkpoints: dict[str, str] = {}
    fields: dict[str, Any] = {"name": name}
    for key, val in block.items():
        if key.startswith("teacher"):
            if not isinstance(val, Mapping):
                raise ValueError(f"{where}.{key} must be a mapping with mimic_name")
            bad = set(val) - _UP_TEACHER_KEYS
            if bad:
                raise ValueError(f"{where}.{key}: unknown keys {sorted(bad)}; valid: {', '.join(sorted(_UP_TEACHER_KEYS))}")
            if "mimic_name" not in val:
                raise ValueError(f"{where}.{key}.mimic_name is required")
            if val.get("teacher_bn_mode", "eval") != "eval":
                raise ValueError(f"{where}.{key}.teacher_bn_mode: only 'eval' is supported (teachers always run "
                                 "in eval mode under no_grad)")
            teachers[key] = _names(val["mimic_name"], f"{where}.{key}.mimic_name")
            weight = val.get("teacher_weight")
            if weight is not None:
                if not isinstance(weight, str) or not weight:
                    raise ValueError(f"{where}.{key}.teacher_weight is the path of the teacher's checkpoint "
                                     f"(UP: 'path of teacher model'), got {weight!r}")
                checkpoints[key] = weight
        elif key not in _UP_JOB_KEYS:
            raise ValueError(f"{where}.{key}: unknown key; valid: {', '.join(sorted(_UP_JOB_KEYS))}, teacher<N>")
    if block.get("mimic_ins_type", "base") != "base":
        raise ValueError(f"{where}.mimic_ins_type: only 'base' (plain feature mimic) is supported, got "
                         f"{block['mimic_ins_type']!r}; the other UP mimickers are detection-specific")
    if not teachers:
        raise ValueError(f"{where}: a mimic job needs at least one teacher<N> block")
    student = block.get("student")
    if not isinstance(student, Mapping) or "mimic_name" not in student:
        raise ValueError(f"{where}.student.mimic_name is required")
    if set(student) - {"mimic_name"}:
        raise ValueError(f"{where}.student: unknown keys {sorted(set(student) - {'mimic_name'})}; valid: mimic_name")
    fields["student"] = _names(student["mimic_name"], f"{where}.student.mimic_name")
    for t, names in teachers.items():
        if len(names) != len(fields["student"]):
            raise ValueError(f"{where}.{t}.mimic_name has {len(names)} names but {where}.student.mimic_name has "
                             f"{len(fields['student'])}; they are paired in order")
    cfgs = block.get("cfgs") or {}
    if not isinstance(cfgs, Mapping) or set(cfgs) - {"loss"}:
        raise ValueError(f"{where}.cfgs: only a 'loss' entry ({{type, kwargs}}) is supported, got "
                         f"{sorted(cfgs) if isinstance(cfgs, Mapping) else cfgs!r}")
    fields["loss"] = cfgs.get("loss") or _UP_DEFAULT_LOSS
    for k in ("loss_weight", "warm_up_iters", "reduce", "adapter"):
        if k in block:
            fields[k] = block[k]
    fields["teachers"] = teachers
    fields["teacher_checkpoints"] = checkpoints
    try:
        return MimicJob.model_validate(fields)
    except ValidationError as e:
        raise _named_error(e, where, {"loss": f"{where}.cfgs.loss", "student": f"{where}.student.mimic_name",
                                      "teachers": where}) from None


def _native_jobs(raw: Any, where: str) -> list[MimicJob]:
    if isinstance(raw, (str, bytes)) or not isinstance(raw, Sequence):
        raise ValueError(f"{where} must be a list of jobs, got {type(raw).__name__}")
    jobs = []
    for i, j in enumerate(raw):
        if not isinstance(j, Mapping):
            raise ValueError(f"{where}.{i} must be a mapping, got {type(j).__name__}")
        try:
            jobs.append(MimicJob.model_validate({"name": f"mimic_job{i}", **j}))
        except ValidationError as e:
            raise _named_error(e, f"{where}.{i}", {}) from None
    return jobs


def parse_mimic_config(raw: Mapping[str, Any] | Sequence[Mapping[str, Any]]) -> MimicConfig:
    """Parse a ``mimic:`` block in any of its shapes (module docstring) into a :class:`MimicConfig`.

    A dict whose only key is ``mimic`` is unwrapped. Every error is a ``ValueError`` naming the
    offending key, e.g. ``mimic.mimic_job1.teacher1.mimic_name``.
    """
    where = "mimic"
    if isinstance(raw, Mapping) and set(raw) == {"mimic"}:
        raw = raw["mimic"]
    if isinstance(raw, Sequence) and not isinstance(raw, (str, bytes)):
        return MimicConfig.from_jobs(_native_jobs(raw, where))
    if not isinstance(raw, Mapping):
        raise ValueError(f"mimic must be a mapping or a list of jobs, got {type(raw).__name__}")
    body = dict(raw)
    task_loss = body.pop("task_loss", True)
    if not isinstance(task_loss, bool):
        raise ValueError(f"mimic.task_loss must be true or false, got {task_loss!r}")
    if "jobs" in body:
        if body.keys() - {"jobs"}:
            raise ValueError(f"mimic: with `jobs` the only other key is task_loss, got {sorted(body.keys() - {'jobs'})}")
        jobs = _native_jobs(body["jobs"], f"{where}.jobs")
    elif "mimic_as_jobs" in body:
        if body.pop("mimic_as_jobs") is not True:
            raise ValueError("mimic.mimic_as_jobs must be True or absent")
        jobs = []
        for key, block in body.items():
            if not str(key).startswith("mimic_job"):
                raise ValueError(f"mimic.{key}: with mimic_as_jobs every key must be a job named mimic_job<N>")
            jobs.append(_up_job(str(key), block, f"{where}.{key}"))
        if not jobs:
            raise ValueError("mimic: mimic_as_jobs is True but there is no mimic_job<N> block")
    else:
        if "student" not in body:
            raise ValueError("mimic: a single mimic job needs a 'student' key; for several jobs set "
                             "mimic_as_jobs: True and name them mimic_job0, mimic_job1, ...")
        jobs = [_up_job("mimic_job0", body, where)]
    return MimicConfig.from_jobs(jobs, task_loss)
