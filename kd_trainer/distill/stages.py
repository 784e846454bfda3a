"""Sequential methods: ordered stages, each with its own length, trainable parts and loss.

Design (and why). The facts to respect: ``Trainer.create_optimizer`` runs once per ``train()``
and takes only the parameters that have ``requires_grad`` at that moment; a callback cannot
replace ``trainer.optimizer`` (the training loop holds the accelerate-wrapped one); flipping
``requires_grad`` on a model that DDP already wraps desynchronises DDP's reducer, which fixed
its parameter set and buckets at construction. So:

* **One training loop over all stages.** ``max_steps`` is the sum of the stage lengths and the
  global step is continuous, so checkpoints, ``resume_from_checkpoint``, logging and the data
  order all stay plain Trainer behaviour. Stage *k* owns global steps ``[start_k, end_k)``; the
  stage of a step is a pure function of ``state.global_step``, so a resumed run knows its stage
  from the restored state alone, with no bookkeeping to save.
* **requires_grad never changes.** A frozen tower is *run* under ``torch.no_grad()`` (the
  student's ``forward(no_grad=...)``), so it builds no autograd graph and gets no gradient; DDP
  sees an unused parameter, which ``find_unused_parameters=True`` (the Trainer's default for a
  non-``PreTrainedModel``) handles. Named-module freezing inside a tower keeps autograd for the
  tower, and the trainer drops the frozen parameters' gradients before clipping.
* **The Trainer's optimizer is a :class:`StagedOptimizer`** built once, wrapped once by
  accelerate. It holds one inner optimizer, over exactly the current stage's trainable
  parameters, and replaces it with a fresh one when the next stage begins: the fresh optimizer
  (and fresh LR schedule, :class:`StagedScheduler`) per stage that the original has, while frozen
  parameters hold no optimizer state. Its ``state_dict`` carries the stage index, so the Trainer's
  own checkpointing saves and restores the right inner optimizer.
* **:class:`StageScheduler` is the callback** that switches stages at ``on_step_begin``, forces a
  log, an evaluation and a checkpoint at every stage end, and announces each stage. Stopping exactly at a
  boundary saves stage *k*'s optimizer; on resume the first step is stage *k+1*'s, so the switch
  happens then, exactly as it does in an uninterrupted run.

DeepSpeed and FSDP build or shard the optimizer themselves, so they cannot host a staged optimizer:
a multi-stage recipe under them is refused; run the stages as separate recipes chained with
``student.checkpoint`` (continue-from) there.
"""

from __future__ import annotations

import difflib
import logging
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import torch
from torch import nn
from transformers import TrainerCallback

from kd_trainer.recipe.schedules import Clock
from kd_trainer.recipe import LossConfig, StageConfig, Trainable

logger = logging.getLogger("kd_trainer")

# Parameter-name prefixes of each student tower (RetrievalModel around an open_clip CLIP).
TOWER_PREFIXES = {
    "image": ("clip.visual.", "image_proj."),
    "text": ("clip.token_embedding.", "clip.positional_embedding", "clip.transformer.", "clip.ln_final.",
             "clip.text_projection", "text_proj."),
}


@dataclass
class Stage:
    """A stage as the trainer runs it: its recipe entry plus its place on the global step axis."""

    index: int  # 0-based
    name: str
    trainable: Trainable
    loss: LossConfig
    epochs: int | None = None
    steps: int | None = None
    learning_rate: float | None = None
    eval_hybrids: list[str] = field(default_factory=list)
    start_step: int = 0
    end_step: int = 0  # exclusive

    @property
    def num_steps(self) -> int:
        return self.end_step - self.start_step


class StagePlan:
    """The ordered stages of a run and where each begins and ends, in optimizer steps."""

    def __init__(self, stages: Sequence[Stage]):
        if not stages:
            raise ValueError("a stage plan needs at least one stage")
        self.stages = list(stages)
        self.steps_per_epoch: int | None = None

    @classmethod
    def from_configs(cls, configs: Sequence[StageConfig], *, has_teacher: bool) -> "StagePlan":
        stages = []
        for i, c in enumerate(configs):
            hybrids = c.eval_hybrids
            if hybrids is None:
                hybrids = [c.trainable] if c.trainable in ("image", "text") and has_teacher else []
            elif hybrids and not has_teacher:
                raise ValueError(f"stage {c.name!r} asks for hybrid evaluation {hybrids}, which needs a teacher")
            stages.append(Stage(i, c.name, c.trainable, c.loss, c.epochs, c.steps, c.learning_rate, list(hybrids)))
        return cls(stages)

    @classmethod
    def single(cls, loss: LossConfig) -> "StagePlan":
        """A plain run: one stage that trains everything for the Trainer's own length."""
        return cls([Stage(0, "train", "all", loss)])

    @property
    def is_single(self) -> bool:
        return len(self.stages) == 1 and self.stages[0].trainable == "all"

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


def trainable_names(model: nn.Module, trainable: Trainable) -> list[str]:
    """Names of the parameters a stage trains; an unknown name prefix is an error listing close ones."""
    names = [n for n, _ in model.named_parameters()]
    if trainable == "all":
        return names
    if isinstance(trainable, str):
        return [n for n in names if n.startswith(TOWER_PREFIXES[trainable])]
    chosen: list[str] = []
    for prefix in trainable:
        hits = [n for n in names if n == prefix or n.startswith(prefix + ".")]
        if not hits:
            modules = sorted({n.rsplit(".", 1)[0] for n in names} | set(names))
            close = difflib.get_close_matches(prefix, modules, n=5, cutoff=0.5)
            raise ValueError(f"trainable entry {prefix!r} matches no parameter of the student. "
                             f"Closest names: {close or modules[:5]}. Names are dotted module paths of the "
                             "student, e.g. clip.visual.transformer.resblocks.0")
        chosen += [h for h in hits if h not in chosen]
    return chosen


def towers_of(names: Sequence[str]) -> frozenset[str]:
    """``image``/``text``: the student towers that own at least one of these parameter names."""
    return frozenset(t for t, prefixes in TOWER_PREFIXES.items() if any(n.startswith(prefixes) for n in names))


class StagedOptimizer(torch.optim.Optimizer):
    """The Trainer's optimizer for a staged run: one fresh inner optimizer per stage.

    ``build(stage_index)`` returns a new optimizer over that stage's trainable parameters. Only
    the current stage's inner optimizer exists; the previous one (and its state) is dropped when
    the next stage begins. It is a ``torch.optim.Optimizer`` so that accelerate wraps it (mixed
    precision scaling, device placement) as it would any other.
    """

    def __init__(self, build: Callable[[int], torch.optim.Optimizer], stage: int = 0):  # noqa: D107
        # Deliberately not calling Optimizer.__init__: the parameter groups are the inner's.
        self._build = build
        self.stage = stage
        self.inner = build(stage)
        self._optimizer_step_pre_hooks: dict = {}
        self._optimizer_step_post_hooks: dict = {}
        self._optimizer_state_dict_pre_hooks: dict = {}
        self._optimizer_state_dict_post_hooks: dict = {}
        self._optimizer_load_state_dict_pre_hooks: dict = {}
        self._optimizer_load_state_dict_post_hooks: dict = {}

    def begin_stage(self, stage: int) -> None:
        if stage != self.stage:
            self.inner = self._build(stage)
            self.stage = stage

    @property  # type: ignore[override]
    def param_groups(self) -> list[dict[str, Any]]:
        return self.inner.param_groups

    @property  # type: ignore[override]
    def state(self) -> Any:
        return self.inner.state

    @property  # type: ignore[override]
    def defaults(self) -> dict[str, Any]:
        return self.inner.defaults

    def step(self, closure: Any = None) -> Any:  # type: ignore[override]
        return self.inner.step(closure)

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.inner.zero_grad(set_to_none=set_to_none)

    def state_dict(self) -> dict[str, Any]:  # type: ignore[override]
        return {"stage": self.stage, "inner": self.inner.state_dict()}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:  # type: ignore[override]
        if "stage" not in state_dict or "inner" not in state_dict:
            raise ValueError("this optimizer state was not saved by a staged run (no 'stage'/'inner' keys); "
                             "resume it with the recipe it was trained with")
        self.begin_stage(int(state_dict["stage"]))
        self.inner.load_state_dict(state_dict["inner"])

    def __repr__(self) -> str:
        return f"StagedOptimizer(stage={self.stage}, inner={self.inner!r})"


class StagedScheduler:
    """The LR schedule of a staged run: a fresh schedule, over the stage's own length, per stage."""

    def __init__(self, optimizer: StagedOptimizer, build: Callable[[int, torch.optim.Optimizer], Any]):
        self.optimizer = optimizer
        self._build = build
        self.stage = optimizer.stage
        self.inner = build(self.stage, optimizer.inner)

    def begin_stage(self, stage: int) -> None:
        if stage != self.stage or self.inner.optimizer is not self.optimizer.inner:
            self.inner = self._build(stage, self.optimizer.inner)
            self.stage = stage

    def step(self) -> None:
        self.inner.step()

    def get_last_lr(self) -> list[float]:
        return self.inner.get_last_lr()

    def state_dict(self) -> dict[str, Any]:
        return {"stage": self.stage, "inner": self.inner.state_dict()}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.begin_stage(int(state_dict["stage"]))
        self.inner.load_state_dict(state_dict["inner"])
        # Building a schedule resets the groups' lr to the schedule's start; the restored schedule
        # knows the lr of the next step, so put it back (the Trainer restores the optimizer first).
        for group, lr in zip(self.optimizer.param_groups, self.inner.get_last_lr()):
            group["lr"] = lr


def _staged(obj: Any, cls: type) -> Any:
    """Reach our staged object inside accelerate's wrappers (``AcceleratedOptimizer.optimizer``)."""
    while obj is not None and not isinstance(obj, cls):
        obj = getattr(obj, "optimizer", None) if cls is StagedOptimizer else getattr(obj, "scheduler", None)
    return obj


class StageScheduler(TrainerCallback):
    """Runs the stages of a :class:`StagePlan`: switches optimizer and schedule when a stage begins,
    evaluates and checkpoints when one ends, and logs which stage is running."""

    def __init__(self, plan: StagePlan):
        self.plan = plan
        self._announced: int | None = None

    def on_step_begin(self, args: Any, state: Any, control: Any, optimizer: Any = None,
                      lr_scheduler: Any = None, **kwargs: Any) -> None:
        stage = self.plan.stage_at(state.global_step)
        opt = _staged(optimizer, StagedOptimizer)
        if opt is not None:
            opt.begin_stage(stage.index)
        sched = _staged(lr_scheduler, StagedScheduler)
        if sched is not None:
            sched.begin_stage(stage.index)
        if self._announced != stage.index and state.is_world_process_zero:
            logger.info("stage %d/%d %r: steps %d-%d, training %s, terms %s", stage.index + 1,
                        len(self.plan.stages), stage.name, stage.start_step, stage.end_step - 1,
                        stage.trainable, [t.key for t in stage.loss.terms])
        self._announced = stage.index

    def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> Any:
        # Every stage ends with an evaluation and a checkpoint, unless the epoch end is about
        # to do the same (it follows this call) or the user turned them off.
        ends = any(state.global_step == s.end_step for s in self.plan.stages[:-1])
        if not ends:
            return control
        control.should_log = True  # no logging window spans two stages
        per_epoch = self.plan.steps_per_epoch or 0
        at_epoch_end = per_epoch > 0 and state.global_step % per_epoch == 0
        if args.eval_strategy != "no" and not (args.eval_strategy == "epoch" and at_epoch_end):
            control.should_evaluate = True
        if args.save_strategy not in ("no", "best") and not (args.save_strategy == "epoch" and at_epoch_end):
            control.should_save = True
        return control
