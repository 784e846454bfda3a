"""Feature mimic jobs (UP/EOD's ``mimic:`` config): teachers, adapters, warm-up, losses.

A *job* distils named intermediate features (``mimic_name``) of one or more teachers into
the student with one loss, a weight and a warm-up. The config mirrors UP/EOD's one to one
(:func:`parse_mimic` reads both of its shapes), and :class:`MimicEngine` runs it with plain
PyTorch, knowing nothing about the Trainer: it taps the features, runs teachers frozen, adapts
widths with trainable adapters and returns every loss by name.

One step, the way a ``compute_loss`` uses it::

    with engine.capture() as cap:                    # taps open on student and teachers
        out = student(**inputs)                      # the ordinary student forward
        engine.run_teachers(inputs)                  # eval mode, torch.no_grad()
        logs = engine.losses(cap.student, cap.teachers, step=global_step)
    loss = task_loss + logs["mimic/total"]           # taps are empty again here

Adapters run at the end of the student's forward (a forward hook the engine puts on the
student), so a DDP-wrapped student runs them inside its forward; ``out["mimic_adapted"]``
holds their outputs when the student returns a dict.

Semantics taken from UP's ``base`` mimicker: student name ``i`` is paired with each teacher's
name ``i``; a teacher's value is the mean of the loss over its pairs; teachers combine by sum
(UP) or mean (``reduce``); the job's weight is ``loss_weight * min(1, step / warm_up_iters)``
(``warm_up_iters`` <= 0: no warm-up), times UP's ``cfgs.loss.kwargs.loss_weight`` if given.
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator
from torch import nn

from kd_trainer.distill.features import DEFAULT_PREFIXES, CapturedFeatures, FeatureTap, parse_feature_name
from kd_trainer.distill.mimic_losses import BuiltLoss, build_loss, canonical_loss_name

__all__ = [
    "MimicLoss",
    "MimicJob",
    "MimicConfig",
    "parse_mimic",
    "parse_mimic_config",
    "warmup_weight",
    "plan_adapter",
    "make_adapter",
    "MimicHead",
    "Captured",
    "MimicStep",
    "MimicEngine",
    "TOTAL_KEY",
    "ADAPTED_KEY",
]

TOTAL_KEY = "mimic/total"
# Where a training forward of the student puts its adapted features (a dict output only).
ADAPTED_KEY = "mimic_adapted"
AdapterMode = Literal["auto", "none", "linear", "conv1x1"]


# --------------------------------------------------------------------------- config


class MimicLoss(BaseModel):
    """UP's ``cfgs.loss``: a registered loss name (ours or UP's) and its kwargs."""

    model_config = ConfigDict(extra="forbid")

    type: str = Field(description="loss name: l2, l1, smooth_l1, cosine, kl, kd, ce, kld, or UP's l2_loss, ...")
    kwargs: dict[str, Any] = Field(default_factory=dict, description="keyword arguments of the loss")

    @model_validator(mode="after")
    def _buildable(self) -> MimicLoss:
        build_loss(self.type, self.kwargs)  # unknown names/kwargs fail at config time
        return self

    @property
    def name(self) -> str:
        """Our name for the loss (``l2_loss`` -> ``l2``): the last part of its log key."""
        return canonical_loss_name(self.type)

    def build(self) -> BuiltLoss:
        return build_loss(self.type, self.kwargs)


def warmup_weight(loss_weight: float, warm_up_iters: int, step: int) -> float:
    """``loss_weight * min(1, step / warm_up_iters)``; ``warm_up_iters <= 0`` means no warm-up.

    ``step`` is the absolute (global) optimizer step, so the ramp resumes where a restored
    run left off instead of restarting."""
    if warm_up_iters is None or warm_up_iters <= 0:
        return float(loss_weight)
    return float(loss_weight) * min(1.0, max(0, step) / warm_up_iters)


class MimicJob(BaseModel):
    """One mimic job: UP's ``mimic`` (or ``mimic_jobN``) block in our field names."""

    model_config = ConfigDict(extra="forbid")

    name: str = Field("mimic_job0", description="job name; the second part of every log key")
    loss: MimicLoss = Field(description="the loss between paired features (UP: cfgs.loss)")
    loss_weight: float = Field(1.0, ge=0, description="job weight after warm-up")
    warm_up_iters: int = Field(-1, ge=-1, description="linear ramp length in global steps; -1 or 0: none")
    teachers: dict[str, list[str]] = Field(
        min_length=1, description="teacher name -> feature names, paired in order with `student`")
    student: list[str] = Field(min_length=1, description="student feature names")
    reduce: Literal["sum", "mean"] = Field("sum", description="how teachers combine: sum (UP) or mean")
    adapter: AdapterMode = Field(
        "auto", description="auto: linear (tokens) / 1x1 conv (maps) only where widths differ; "
                            "linear/conv1x1: always; none: shapes must match")
    teacher_checkpoints: dict[str, str] = Field(
        default_factory=dict, description="UP's teacher_weight: checkpoint path per teacher (for the caller to load)")

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
        for name in (*self.student, *(n for names in self.teachers.values() for n in names)):
            parse_feature_name(name)
        for t, names in self.teachers.items():
            if len(names) != len(self.student):
                raise ValueError(f"teacher {t!r} has {len(names)} feature names but the student has "
                                 f"{len(self.student)}; they are paired in order")
        extra = set(self.teacher_checkpoints) - set(self.teachers)
        if extra:
            raise ValueError(f"teacher_checkpoints names teachers {sorted(extra)} that are not in `teachers`")
        return self

    def weight(self, step: int) -> float:
        """The job weight at global ``step`` (warm-up ramp included, loss scale excluded)."""
        return warmup_weight(self.loss_weight, self.warm_up_iters, step)


@dataclass
class MimicConfig:
    """Parsed ``mimic:`` block: the jobs, and UP's ``task_loss`` (False: train on mimic alone)."""

    jobs: list[MimicJob]
    task_loss: bool = True


_UP_JOB_KEYS = {"mimic_ins_type", "loss_weight", "warm_up_iters", "cfgs", "student", "reduce", "adapter"}
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
            bad = set(val) - {"mimic_name", "teacher_weight", "teacher_bn_mode"}
            if bad:
                raise ValueError(f"{where}.{key}: unknown keys {sorted(bad)}; valid: mimic_name, teacher_weight, "
                                 "teacher_bn_mode")
            if "mimic_name" not in val:
                raise ValueError(f"{where}.{key}.mimic_name is required")
            if val.get("teacher_bn_mode", "eval") != "eval":
                raise ValueError(f"{where}.{key}.teacher_bn_mode: only 'eval' is supported (teachers always run "
                                 "in eval mode under no_grad)")
            teachers[key] = _names(val["mimic_name"], f"{where}.{key}.mimic_name")
            if val.get("teacher_weight"):
                checkpoints[key] = str(val["teacher_weight"])
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


def parse_mimic_config(raw: Mapping[str, Any] | Sequence[Mapping[str, Any]]) -> MimicConfig:
    """Parse a ``mimic:`` block in either UP shape, or a list of jobs in our own field names.

    - single job: ``{loss_weight, warm_up_iters, cfgs: {loss: {type, kwargs}}, teacher0:
      {teacher_weight?, mimic_name: [...]}, student: {mimic_name: [...]}}``;
    - ``{mimic_as_jobs: True, mimic_job0: {...}, mimic_job1: {...}}``;
    - ``[{name, loss: {type, kwargs}, teachers: {t: [...]}, student: [...], ...}, ...]``.

    A dict whose only key is ``mimic`` is unwrapped. UP's ``task_loss`` is returned beside the
    jobs. Every error names the offending key, e.g. ``mimic.mimic_job1.teacher1.mimic_name``.
    """
    if isinstance(raw, Sequence) and not isinstance(raw, (str, bytes)):
        jobs = []
        for i, j in enumerate(raw):
            if not isinstance(j, Mapping):
                raise ValueError(f"mimic[{i}] must be a mapping, got {type(j).__name__}")
            try:
                jobs.append(MimicJob.model_validate({"name": f"mimic_job{i}", **j}))
            except ValidationError as e:
                raise _named_error(e, f"mimic[{i}]", {}) from None
        return MimicConfig(_check_jobs(jobs, "mimic"))
    if not isinstance(raw, Mapping):
        raise ValueError(f"mimic must be a mapping or a list of jobs, got {type(raw).__name__}")
    where = "mimic"
    if set(raw) == {"mimic"}:
        raw = raw["mimic"]
    body = dict(raw)
    task_loss = body.pop("task_loss", True)
    if not isinstance(task_loss, bool):
        raise ValueError(f"mimic.task_loss must be true or false, got {task_loss!r}")
    if "mimic_as_jobs" in body:
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
    return MimicConfig(_check_jobs(jobs, where), task_loss)


def _check_jobs(jobs: list[MimicJob], where: str) -> list[MimicJob]:
    seen: set[str] = set()
    ckpt: dict[str, str] = {}
    for j in jobs:
        if j.name in seen:
            raise ValueError(f"{where}: job name {j.name!r} appears twice")
        seen.add(j.name)
        for t, path in j.teacher_checkpoints.items():
            if ckpt.setdefault(t, path) != path:
                raise ValueError(f"{where}.{j.name}.{t}.teacher_weight {path!r} differs from {ckpt[t]!r} given in "
                                 "another job for the same teacher")
    return jobs


def parse_mimic(raw: Mapping[str, Any] | Sequence[Mapping[str, Any]]) -> list[MimicJob]:
    """The jobs of a ``mimic:`` block (see :func:`parse_mimic_config`)."""
    return parse_mimic_config(raw).jobs


# --------------------------------------------------------------------------- adapters


def plan_adapter(mode: str, s_shape: Sequence[int], t_shape: Sequence[int]) -> tuple[str, int, int] | None:
    """Which adapter maps a student feature of ``s_shape`` onto ``t_shape``: ``None`` (shapes
    already match) or ``(kind, c_student, c_teacher)`` with kind ``linear`` (last dim, token
    features ``... x C``) or ``conv1x1`` (dim 1 of ``N x C x H x W`` maps).

    Anything but the channel width must already agree: a spatial or sequence-length mismatch
    raises ``ValueError`` (no silent interpolation, which would change what is distilled).
    """
    s, t = tuple(s_shape), tuple(t_shape)
    if mode == "none":
        if s != t:
            raise ValueError("shapes differ and adapter is 'none'; set adapter: auto (or linear/conv1x1) to learn a "
                             "projection of the student feature")
        return None
    if len(s) != len(t):
        raise ValueError(f"features have different ranks ({len(s)} vs {len(t)}); no adapter can bridge that")
    if mode == "auto":
        if s == t:
            return None
        mode = "conv1x1" if len(s) == 4 else "linear"
    if mode == "conv1x1":
        if len(s) != 4:
            raise ValueError(f"a conv1x1 adapter needs N x C x H x W feature maps, got rank {len(s)}")
        if (s[0], *s[2:]) != (t[0], *t[2:]):
            raise ValueError("feature maps differ in batch or spatial size (H x W); only the channel width can be "
                             "adapted: tap layers of the same stride or feed inputs of the same size")
        return ("conv1x1", s[1], t[1])
    if mode == "linear":
        if s[:-1] != t[:-1]:
            raise ValueError("token features differ in a dimension other than the last (batch or sequence length); "
                             "only the width can be adapted")
        return ("linear", s[-1], t[-1])
    raise ValueError(f"unknown adapter mode {mode!r}; valid: auto, none, linear, conv1x1")


def make_adapter(kind: str, c_in: int, c_out: int) -> nn.Module:
    """A fresh trainable adapter (FitNets' regressor): ``nn.Linear`` or a 1x1 ``nn.Conv2d``."""
    if kind == "linear":
        return nn.Linear(c_in, c_out)
    if kind == "conv1x1":
        return nn.Conv2d(c_in, c_out, kernel_size=1)
    raise ValueError(f"unknown adapter kind {kind!r}")


class MimicHead(nn.Module):
    """The trainable adapters of all mimic jobs, one per (job, teacher, feature pair).

    Attach it to the student (``student.mimic_head = engine.head``) so the Trainer's optimizer,
    checkpoints and DDP see it. Every adapter exists only to train the student and is dropped
    for inference: :meth:`training_only_keys` lists their state-dict keys. Once the optimizer
    exists, :meth:`lock` makes a late (lazily built) adapter an error instead of a parameter
    that would silently never be optimised.
    """

    def __init__(self) -> None:
        super().__init__()
        self.adapters = nn.ModuleDict()
        self.locked = False

    @staticmethod
    def key(job: str, teacher: str, index: int) -> str:
        """ModuleDict key of an adapter (no dots allowed in module names)."""
        return f"{job}__{teacher}__{index}".replace(".", "_")

    def lock(self) -> None:
        self.locked = True

    def training_only_keys(self, prefix: str = "") -> list[str]:
        """State-dict keys of every adapter (``prefix`` = where the head is attached, e.g.
        ``"mimic_head."``): all of them are training-only."""
        return [prefix + k for k in self.state_dict()]

    def forward(self, key: str, x: torch.Tensor) -> torch.Tensor:
        adapter = self.adapters[key] if key in self.adapters else None
        if adapter is None:
            return x
        weight = next(adapter.parameters())
        return adapter(x.to(weight.dtype))


# --------------------------------------------------------------------------- engine


@dataclass
class Captured:
    """The live feature mappings of one capture; emptied when the capture exits."""

    student: CapturedFeatures
    teachers: dict[str, CapturedFeatures]


@dataclass
class MimicStep:
    """What :meth:`MimicEngine.run` returns."""

    output: Any
    teacher_outputs: dict[str, Any]
    losses: dict[str, torch.Tensor] = field(default_factory=dict)


def _call(module: nn.Module, inputs: Any) -> Any:
    if isinstance(inputs, Mapping):
        return module(**inputs)
    if isinstance(inputs, tuple):
        return module(*inputs)
    return module(inputs)


_SAME = object()


class MimicEngine:
    """Runs mimic jobs: owns the feature taps, freezes the teachers, applies adapters, weights.

    ``teachers`` maps the names the jobs use (``teacher0``...) to modules; teachers no job
    names are left alone. Teachers used by a job are put in eval mode and frozen
    (``requires_grad_(False)``) here, and :meth:`run_teachers` runs them under
    ``torch.no_grad()`` and re-asserts eval mode each call (a Trainer's ``model.train()``
    only reaches the student). ``head`` holds the adapters (a new :class:`MimicHead` if not
    given).
    """

    def __init__(
        self,
        student: nn.Module,
        teachers: Mapping[str, nn.Module],
        jobs: Sequence[MimicJob],
        *,
        head: MimicHead | None = None,
        prefixes: Sequence[str] = DEFAULT_PREFIXES,
        log_pairs: bool = False,
    ):
        self.jobs = list(_check_jobs(list(jobs), "mimic"))
        if not self.jobs:
            raise ValueError("MimicEngine needs at least one mimic job")
        self.student = student
        used: dict[str, list[str]] = {}
        for job in self.jobs:
            for t, names in job.teachers.items():
                if t not in teachers:
                    raise ValueError(f"mimic job {job.name!r} names teacher {t!r}, but the teachers given are "
                                     f"{sorted(teachers) or '(none)'}")
                used.setdefault(t, []).extend(names)
        self.teachers: dict[str, nn.Module] = {t: teachers[t] for t in used}
        for t, model in self.teachers.items():
            if model is student:
                raise ValueError(f"teacher {t!r} is the student module itself")
            model.eval()
            model.requires_grad_(False)
        self._loss_fns = {job.name: job.loss.build() for job in self.jobs}
        self.head = head if head is not None else MimicHead()
        self.log_pairs = log_pairs
        student_names = [n for job in self.jobs for n in job.student]
        self.student_tap = FeatureTap(student, student_names, prefixes=prefixes)
        self.teacher_taps = {t: FeatureTap(self.teachers[t], names, prefixes=prefixes) for t, names in used.items()}
        # Adapter key -> the student feature it maps. Adapters run at the end of the student's
        # own forward (a hook on the student module), so under DDP they run inside the wrapped
        # forward and their outputs are part of its output: see _adapt_in_forward.
        self._adapter_input = {MimicHead.key(job.name, t, i): sn
                               for job in self.jobs for t in job.teachers for i, sn in enumerate(job.student)}
        self._live_student: CapturedFeatures | None = None
        self._adapted: dict[str, torch.Tensor] = {}
        self._adapt_hook = student.register_forward_hook(self._adapt_in_forward)

    # ---------------------------------------------------------------- weights and keys

    def weight(self, job: MimicJob | str, step: int) -> float:
        """Effective weight of ``job`` at global ``step``: warm-up ramp times UP's loss scale."""
        j = self._job(job)
        return j.weight(step) * self._loss_fns[j.name].scale

    def _job(self, job: MimicJob | str) -> MimicJob:
        name = job.name if isinstance(job, MimicJob) else job
        for j in self.jobs:
            if j.name == name:
                return j
        raise KeyError(f"no mimic job {name!r}; jobs: {[j.name for j in self.jobs]}")

    def log_keys(self) -> list[str]:
        """Every key :meth:`losses` returns (without per-pair keys), in order."""
        keys = []
        for job in self.jobs:
            keys += [f"mimic/{job.name}/{t}/{job.loss.name}" for t in job.teachers]
            keys.append(f"mimic/{job.name}/weighted")
        return keys + [TOTAL_KEY]

    # ---------------------------------------------------------------- capture and forwards

    @contextlib.contextmanager
    def capture(self) -> Iterator[Captured]:
        """Open every tap for one step; the yielded dicts are emptied on exit."""
        with contextlib.ExitStack() as stack:
            s = stack.enter_context(self.student_tap.capture())
            ts = {t: stack.enter_context(tap.capture()) for t, tap in self.teacher_taps.items()}
            self._live_student, self._adapted = s, {}
            try:
                yield Captured(student=s, teachers=ts)
            finally:
                self._live_student, self._adapted = None, {}

    def _adapt_in_forward(self, module: nn.Module, args: Any, output: Any) -> Any:
        """Forward hook on the student: in a training forward inside :meth:`capture`, apply every
        adapter to its captured student feature and add the results to the output dict.

        Why here and not in :meth:`losses`: DDP (with ``find_unused_parameters``, the Trainer's
        default) marks parameters its forward's outputs do not depend on as unused, so adapters
        applied after the wrapped forward would get their gradient twice and fail the backward.
        Computed inside the forward and returned in ``output[ADAPTED_KEY]``, they are used
        parameters like any other. A student whose forward returns something other than a dict
        still works in one process; under DDP it needs ``ddp_find_unused_parameters=False``.
        """
        feats = self._live_student
        if feats is None or not module.training or not len(self.head.adapters):
            return None
        self._adapted = {key: self.head(key, feats[name]) for key, name in self._adapter_input.items()
                         if key in self.head.adapters and name in feats}
        if self._adapted and isinstance(output, dict):
            output[ADAPTED_KEY] = self._adapted
        return None

    def run_teachers(
        self, inputs: Any = None, forward: Callable[[str, nn.Module], Any] | None = None
    ) -> dict[str, Any]:
        """Run every mimic teacher in eval mode under ``torch.no_grad()``.

        ``inputs``: a dict (keyword arguments), a tuple (positional) or one tensor, the same for
        every teacher; or ``forward(name, teacher)`` for teachers that need their own call.
        """
        outs: dict[str, Any] = {}
        with torch.no_grad():
            for name, teacher in self.teachers.items():
                teacher.eval()
                outs[name] = forward(name, teacher) if forward is not None else _call(teacher, inputs)
        return outs

    def run(
        self,
        student_inputs: Any = None,
        teacher_inputs: Any = _SAME,
        *,
        step: int,
        student_forward: Callable[[nn.Module], Any] | None = None,
        teacher_forward: Callable[[str, nn.Module], Any] | None = None,
    ) -> MimicStep:
        """Student forward (with grad), teacher forwards, and the losses, in one capture.

        ``teacher_inputs`` defaults to ``student_inputs``. Returns the student's output (for
        the task loss), the teachers' outputs and :meth:`losses`; no feature stays in the taps.
        """
        with self.capture() as cap:
            out = student_forward(self.student) if student_forward is not None else _call(self.student, student_inputs)
            t_in = student_inputs if teacher_inputs is _SAME else teacher_inputs
            t_out = self.run_teachers(t_in, teacher_forward)
            losses = self.losses(cap.student, cap.teachers, step=step)
        return MimicStep(out, t_out, losses)

    # ---------------------------------------------------------------- adapters

    def _adapter_for(self, job: MimicJob, teacher: str, i: int, s_shape: Sequence[int], t_shape: Sequence[int],
                     *, device: torch.device, build: bool, step: int | None) -> str | None:
        sname, tname = job.student[i], job.teachers[teacher][i]
        relation = parse_feature_name(sname).kind != "output" or parse_feature_name(tname).kind != "output"
        try:
            if relation:  # attention/relation maps are compared as they are: widths are heads, not channels
                plan = plan_adapter("none", s_shape, t_shape)
            else:
                plan = plan_adapter(job.adapter, s_shape, t_shape)
        except ValueError as e:
            hint = (" Attention maps need equal head counts; '@value:H' picks H relation heads on both sides."
                    if relation else "")
            raise ValueError(f"mimic job {job.name!r}, teacher {teacher!r}: student feature {sname!r} "
                             f"{tuple(s_shape)} vs teacher feature {tname!r} {tuple(t_shape)}: {e}.{hint}") from None
        if plan is None:
            return None
        key = MimicHead.key(job.name, teacher, i)
        kind, c_in, c_out = plan
        if key in self.head.adapters:
            a = self.head.adapters[key]
            if isinstance(a, nn.Linear):
                ok = kind == "linear" and (a.in_features, a.out_features) == (c_in, c_out)
            else:
                ok = kind == "conv1x1" and (a.in_channels, a.out_channels) == (c_in, c_out)
            if not ok:
                raise ValueError(f"adapter {key!r} is {a} but job {job.name!r} now needs {kind} {c_in}->{c_out}")
            return key
        if not build:
            if self.head.locked:
                raise RuntimeError(
                    f"mimic job {job.name!r}, teacher {teacher!r}: adapter {key!r} ({kind} {c_in}->{c_out}) does not "
                    "exist and the head is locked (the optimizer already exists); call engine.build_adapters(...) "
                    "before creating the optimizer")
            warnings.warn(f"mimic adapter {key!r} ({kind} {c_in}->{c_out}) built lazily at step {step}; it trains only "
                          "if it is in the optimizer: prefer engine.build_adapters(...) before the optimizer exists",
                          stacklevel=3)
        dtype = next((p.dtype for p in self.student.parameters() if p.is_floating_point()), torch.float32)
        self.head.adapters[key] = make_adapter(kind, c_in, c_out).to(device=device, dtype=dtype)
        return key

    def build_adapters_from_shapes(
        self, student_shapes: Mapping[str, Sequence[int]], teacher_shapes: Mapping[str, Mapping[str, Sequence[int]]],
        device: torch.device | str | None = None,
    ) -> list[str]:
        """Create every adapter the jobs need from feature shapes; returns the adapter keys."""
        if device is None:
            device = next((p.device for p in self.student.parameters()), torch.device("cpu"))
        keys = []
        for job in self.jobs:
            for t in job.teachers:
                for i, (sn, tn) in enumerate(zip(job.student, job.teachers[t])):
                    k = self._adapter_for(job, t, i, student_shapes[sn], teacher_shapes[t][tn],
                                          device=torch.device(device), build=True, step=None)
                    if k is not None:
                        keys.append(k)
        return keys

    def build_adapters(
        self,
        student_inputs: Any = None,
        teacher_inputs: Any = _SAME,
        *,
        student_forward: Callable[[nn.Module], Any] | None = None,
        teacher_forward: Callable[[str, nn.Module], Any] | None = None,
    ) -> list[str]:
        """Dry-run one batch (no grad, student briefly in eval mode so BatchNorm statistics are
        untouched) and create every adapter the captured shapes need, before the optimizer and
        before loading a checkpoint that contains them. Returns the adapter keys."""
        was_training = self.student.training
        self.student.eval()
        try:
            with torch.no_grad(), self.capture() as cap:
                if student_forward is not None:
                    student_forward(self.student)
                else:
                    _call(self.student, student_inputs)
                self.run_teachers(student_inputs if teacher_inputs is _SAME else teacher_inputs, teacher_forward)
                s_shapes = {k: tuple(v.shape) for k, v in cap.student.items()}
                t_shapes = {t: {k: tuple(v.shape) for k, v in d.items()} for t, d in cap.teachers.items()}
                self._require(cap.student, cap.teachers)
        finally:
            self.student.train(was_training)
        return self.build_adapters_from_shapes(s_shapes, t_shapes)

    # ---------------------------------------------------------------- losses

    def _require(
        self, student_feats: Mapping[str, torch.Tensor], teacher_feats: Mapping[str, Mapping[str, torch.Tensor]]
    ) -> None:
        missing = [f"student {n!r}" for n in self.student_tap.names if n not in student_feats]
        for t, tap in self.teacher_taps.items():
            got = teacher_feats.get(t, {})
            missing += [f"{t} {n!r}" for n in tap.names if n not in got]
        if missing:
            raise RuntimeError(
                f"mimic features not captured in this step: {', '.join(missing)}. Run the student and every mimic "
                "teacher forward inside engine.capture() (a cached teacher embedding has no intermediate features), "
                "and check the forward reaches those modules")

    def losses(
        self,
        student_feats: Mapping[str, torch.Tensor],
        teacher_feats: Mapping[str, Mapping[str, torch.Tensor]],
        step: int,
    ) -> dict[str, torch.Tensor]:
        """Every mimic loss of one step, by log key.

        - ``mimic/<job>/<teacher>/<loss>``: unweighted, mean over that teacher's feature pairs;
        - ``mimic/<job>/<teacher>/<loss>/<i>``: per pair, only with ``log_pairs=True``;
        - ``mimic/<job>/weighted``: ``weight(job, step) * (sum | mean over teachers)``;
        - ``mimic/total``: the sum of the weighted job values, the one term to add to the loss.

        ``step`` is the global optimizer step (the warm-up ramp's clock). Teacher features are
        detached; losses are computed in float32.
        """
        self._require(student_feats, teacher_feats)
        out: dict[str, torch.Tensor] = {}
        total: torch.Tensor | None = None
        for job in self.jobs:
            fn = self._loss_fns[job.name]
            per_teacher = []
            for t, tnames in job.teachers.items():
                vals = []
                for i, (sn, tn) in enumerate(zip(job.student, tnames)):
                    s, tf = student_feats[sn], teacher_feats[t][tn].detach()
                    key = self._adapter_for(job, t, i, s.shape, tf.shape, device=s.device, build=False, step=step)
                    if key is not None:  # adapted in the student's forward when it ran in training mode
                        adapted = self._adapted.get(key)
                        s = adapted if adapted is not None else self.head(key, s)
                    v = fn(s.float(), tf.float())
                    vals.append(v)
                    if self.log_pairs:
                        out[f"mimic/{job.name}/{t}/{job.loss.name}/{i}"] = v
                value = torch.stack(vals).mean()
                out[f"mimic/{job.name}/{t}/{job.loss.name}"] = value
                per_teacher.append(value)
            combined = torch.stack(per_teacher).sum() if job.reduce == "sum" else torch.stack(per_teacher).mean()
            weighted = combined * self.weight(job, step)
            out[f"mimic/{job.name}/weighted"] = weighted
            total = weighted if total is None else total + weighted
        assert total is not None
        out[TOTAL_KEY] = total
        return out

    # ---------------------------------------------------------------- teardown

    def remove(self) -> None:
        """Take every hook off the student and the teachers."""
        self.student_tap.remove()
        self._adapt_hook.remove()
        for tap in self.teacher_taps.values():
            tap.remove()

    def __enter__(self) -> MimicEngine:
        return self

    def __exit__(self, *exc: object) -> None:
        self.remove()
