"""The mimic engine: runs a recipe's mimic jobs on a student and its teachers with plain PyTorch.

It knows nothing about the Trainer: it taps the named modules (:mod:`kd_trainer.models.taps`),
runs the teachers frozen, adapts widths with trainable adapters (:mod:`.adapters`), weighs each
job by its schedule and returns every loss (:mod:`kd_trainer.losses.mimic`) by log key
(:mod:`kd_trainer.log_keys`). The jobs come parsed from the recipe
(:class:`kd_trainer.recipe.mimic.MimicJob`).

One step, the way a ``compute_loss`` uses it::

    with engine.capture() as cap:                    # taps open on student and teachers
        out = student(**inputs)                      # the ordinary student forward
        engine.run_teachers(inputs)                  # eval mode, torch.no_grad()
        logs = engine.losses(cap.student, cap.teachers, step=global_step)
    loss = task_loss + logs[MIMIC_TOTAL_KEY]         # taps are empty again here

Adapters run at the end of the student's forward (a forward hook the engine puts on the
student), so a DDP-wrapped student runs them inside its forward; ``out[ADAPTED_KEY]`` holds
their outputs when the student returns a dict.

Semantics taken from UP's ``base`` mimicker: student name ``i`` is paired with each teacher's
name ``i``; a teacher's value is the mean of the loss over its pairs; teachers combine by sum
(UP) or mean (``reduce``); the job's weight is its schedule (``loss_weight``, ramped over
``warm_up_iters`` global steps) times UP's ``cfgs.loss.kwargs.loss_weight`` if given.
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from kd_trainer.distill.mimic.adapters import MimicHead, make_adapter, plan_adapter
from kd_trainer.log_keys import MIMIC_TOTAL_KEY, mimic_key, mimic_weighted_key
from kd_trainer.models.taps import WRAPPER_PREFIXES, Tap, TappedOutputs, parse_tap_name
from kd_trainer.recipe.mimic import MimicConfig, MimicJob
from kd_trainer.recipe.schedules import Clock

__all__ = ["ADAPTED_KEY", "Captured", "MimicEngine", "MimicStep"]

# Where a training forward of the student puts its adapted outputs (a dict output only).
ADAPTED_KEY = "mimic_adapted"


@dataclass
class Captured:
    """The tapped outputs of one capture (student, and each teacher by name); emptied when it exits."""

    student: TappedOutputs
    teachers: dict[str, TappedOutputs]


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
    """Runs mimic jobs: owns the taps, freezes the teachers, applies adapters, weighs the jobs.

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
        prefixes: Sequence[str] = WRAPPER_PREFIXES,
        log_pairs: bool = False,
    ) -> None:
        if not jobs:
            raise ValueError("MimicEngine needs at least one mimic job")
        self.jobs = MimicConfig.from_jobs(jobs).jobs  # job names unique, one checkpoint per teacher
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
        self._schedules = {job.name: job.weight_schedule for job in self.jobs}
        self._keys = {(job.name, t): mimic_key(job.name, t, job.loss.name) for job in self.jobs for t in job.teachers}
        self.head = head if head is not None else MimicHead()
        self.log_pairs = log_pairs
        student_names = [n for job in self.jobs for n in job.student]
        self.student_tap = Tap(student, student_names, prefixes=prefixes)
        self.teacher_taps = {t: Tap(self.teachers[t], names, prefixes=prefixes) for t, names in used.items()}
        # Adapter key -> the student tap it maps. Adapters run at the end of the student's
        # own forward (a hook on the student module), so under DDP they run inside the wrapped
        # forward and their outputs are part of its output: see _adapt_in_forward.
        self._adapter_input = {MimicHead.key(job.name, t, i): sn
                               for job in self.jobs for t in job.teachers for i, sn in enumerate(job.student)}
        self._live_student: TappedOutputs | None = None
        self._adapted: dict[str, torch.Tensor] = {}
        self._adapt_hook = student.register_forward_hook(self._adapt_in_forward)

    # ---------------------------------------------------------------- weights and keys

    def weight(self, job: MimicJob | str, step: int) -> float:
        """Effective weight of ``job`` at global ``step``: its schedule (the warm-up ramp) times
        UP's loss scale."""
        name = self._job(job).name
        return self._schedules[name](Clock(step=step)) * self._loss_fns[name].scale

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
            keys += [self._keys[job.name, t] for t in job.teachers]
            keys.append(mimic_weighted_key(job.name))
        return keys + [MIMIC_TOTAL_KEY]

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
        adapter to the student output it maps and add the results to the output dict.

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
        the task loss), the teachers' outputs and :meth:`losses`; nothing stays in the taps.
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
        relation = parse_tap_name(sname).kind != "output" or parse_tap_name(tname).kind != "output"
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
        """Create every adapter the jobs need from tapped-output shapes; returns the adapter keys."""
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
        self, student: Mapping[str, torch.Tensor], teachers: Mapping[str, Mapping[str, torch.Tensor]]
    ) -> None:
        missing = [f"student {n!r}" for n in self.student_tap.names if n not in student]
        for t, tap in self.teacher_taps.items():
            got = teachers.get(t, {})
            missing += [f"{t} {n!r}" for n in tap.names if n not in got]
        if missing:
            raise RuntimeError(
                f"mimic taps not captured in this step: {', '.join(missing)}. Run the student and every mimic "
                "teacher forward inside engine.capture() (a cached teacher embedding has no intermediate outputs), "
                "and check the forward reaches those modules")

    def losses(
        self,
        student: Mapping[str, torch.Tensor],
        teachers: Mapping[str, Mapping[str, torch.Tensor]],
        step: int,
    ) -> dict[str, torch.Tensor]:
        """Every mimic loss of one step, by log key, from the tapped outputs of the student and of
        each teacher (``Captured.student``, ``Captured.teachers``).

        - ``mimic/<job>/<teacher>/<loss>``: unweighted, mean over that teacher's tap pairs;
        - ``mimic/<job>/<teacher>/<loss>/<i>``: per pair, only with ``log_pairs=True``;
        - ``mimic/<job>/weighted``: ``weight(job, step) * (sum | mean over teachers)``;
        - ``mimic/total``: the sum of the weighted job values, the one term to add to the loss.

        ``step`` is the global optimizer step (the warm-up ramp's clock). Teacher outputs are
        detached; losses are computed in float32.
        """
        self._require(student, teachers)
        out: dict[str, torch.Tensor] = {}
        total: torch.Tensor | None = None
        for job in self.jobs:
            fn = self._loss_fns[job.name]
            per_teacher = []
            for t, tnames in job.teachers.items():
                vals = []
                for i, (sn, tn) in enumerate(zip(job.student, tnames)):
                    s, tf = student[sn], teachers[t][tn].detach()
                    key = self._adapter_for(job, t, i, s.shape, tf.shape, device=s.device, build=False, step=step)
                    if key is not None:  # adapted in the student's forward when it ran in training mode
                        adapted = self._adapted.get(key)
                        s = adapted if adapted is not None else self.head(key, s)
                    v = fn(s.float(), tf.float())
                    vals.append(v)
                    if self.log_pairs:
                        out[mimic_key(job.name, t, job.loss.name, pair=i)] = v
                value = torch.stack(vals).mean()
                out[self._keys[job.name, t]] = value
                per_teacher.append(value)
            combined = torch.stack(per_teacher).sum() if job.reduce == "sum" else torch.stack(per_teacher).mean()
            weighted = combined * self.weight(job, step)
            out[mimic_weighted_key(job.name)] = weighted
            total = weighted if total is None else total + weighted
        assert total is not None
        out[MIMIC_TOTAL_KEY] = total
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
