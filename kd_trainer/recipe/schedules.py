"""Weight schedules: a term's weight (or the mixing ``alpha``) as a function of training progress.

A schedule is a number (constant) or a mapping with a ``type``; recipes write them inline::

    weight: 2000                                                    # constant
    weight: {type: warmup, value: 1.0, steps: 500, clock: run}      # UP/EOD warm_up_iters
    weight: {type: linear, start: 0.9, end: 0.5, begin: 20, finish: 50, unit: epoch}
    weight: {type: piecewise, unit: epoch, boundaries: [9], values: [0.9, 0.6]}

Progress is counted as *completed* work, the way ``TrainerState`` counts it: during the very
first optimizer step, ``step == 0`` and ``epoch == 0``; epoch-based schedules use whole epochs,
so they change value when an epoch starts, like the original's per-epoch ``alpha``. The clock
is the current stage's (``clock: stage``, the default: every stage of a sequential method
restarts its schedules, as each stage of the original restarts its epoch count) or the whole
run's (``clock: run``: UP's ``warm_up_iters`` ramps on the absolute iteration, and a resumed
run continues the ramp where it stopped because the step comes from the restored state).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated, Literal, Union

from pydantic import BaseModel, ConfigDict, Field, model_validator


@dataclass(frozen=True)
class Clock:
    """Training progress at one optimizer step: completed steps and epochs, run-wide and in-stage."""

    step: int = 0
    epoch: int = 0
    stage_step: int = 0
    stage_epoch: int = 0

    def read(self, unit: str, clock: str) -> int:
        if clock == "run":
            return self.step if unit == "step" else self.epoch
        return self.stage_step if unit == "step" else self.stage_epoch


class _Schedule(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    unit: Literal["step", "epoch"] = Field("step", description="What the schedule counts: optimizer steps or epochs.")
    clock: Literal["stage", "run"] = Field("stage", description="Count from the stage's start or the run's start.")

    def __call__(self, clock: Clock) -> float:
        return self.at(clock.read(self.unit, self.clock))

    def at(self, t: int) -> float:  # pragma: no cover - every subclass defines it
        raise NotImplementedError


class Constant(_Schedule):
    type: Literal["constant"] = "constant"
    value: float

    def at(self, t: int) -> float:
        return self.value


class Warmup(_Schedule):
    """UP/EOD's mimic warm-up, as docs/losses.md gives it: ``value * min(1, t / steps)`` on the
    completed steps ``t`` (so the very first step has weight 0, as UP's iteration 0 does).
    :func:`kd_trainer.distill.mimic.warmup_weight` is the same ramp for mimic jobs."""

    type: Literal["warmup"] = "warmup"
    value: float = 1.0
    steps: int = Field(gt=0, description="Length of the ramp, in `unit`s.")

    def at(self, t: int) -> float:
        return self.value * min(1.0, t / self.steps)


class Linear(_Schedule):
    """``start`` until ``begin``, then a straight line to ``end`` at ``finish``, then ``end``.

    A decay when ``end < start`` (the original's ``--distillation_cosin_weight``: 0.9 at epoch 20
    to 0.5 at epoch 50), a ramp when ``end > start``.
    """

    type: Literal["linear"] = "linear"
    start: float
    end: float
    begin: int = Field(0, ge=0)
    finish: int

    @model_validator(mode="after")
    def _ordered(self) -> "Linear":
        if self.finish <= self.begin:
            raise ValueError(f"linear schedule needs finish > begin, got begin={self.begin} finish={self.finish}")
        return self

    def at(self, t: int) -> float:
        frac = min(1.0, max(0.0, (t - self.begin) / (self.finish - self.begin)))
        return self.start + frac * (self.end - self.start)


class Piecewise(_Schedule):
    """``values[i]`` while ``boundaries[i-1] <= t < boundaries[i]`` (one more value than boundaries).

    The original's default ``alpha``: ``{unit: epoch, boundaries: [9], values: [0.9, 0.6]}``,
    i.e. 0.9 for its (1-based) epochs 1..9 and 0.6 from epoch 10 on.
    """

    type: Literal["piecewise"] = "piecewise"
    boundaries: list[int]
    values: list[float]

    @model_validator(mode="after")
    def _shape(self) -> "Piecewise":
        if len(self.values) != len(self.boundaries) + 1:
            raise ValueError(f"piecewise schedule needs one more value than boundaries, got "
                             f"{len(self.values)} values for {len(self.boundaries)} boundaries")
        if any(b <= a for a, b in zip(self.boundaries, self.boundaries[1:])):
            raise ValueError(f"piecewise boundaries must increase strictly, got {self.boundaries}")
        return self

    def at(self, t: int) -> float:
        i = sum(1 for b in self.boundaries if t >= b)
        return self.values[i]


Schedule = Annotated[Union[Constant, Warmup, Linear, Piecewise], Field(discriminator="type")]
ScheduleLike = Union[float, Schedule]


def value_at(schedule: ScheduleLike, clock: Clock) -> float:
    """The value of a schedule (or a plain number) at ``clock``."""
    if isinstance(schedule, (int, float)):
        return float(schedule)
    return schedule(clock)


def uses_epochs(schedule: ScheduleLike) -> bool:
    return isinstance(schedule, _Schedule) and schedule.unit == "epoch"
