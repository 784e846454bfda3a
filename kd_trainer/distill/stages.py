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
* **The Trainer's optimizer is a :class:`StageOptimizer`** built once, wrapped once by
  accelerate. It holds one inner optimizer, over exactly the current stage's trainable
  parameters, and replaces it with a fresh one when the next stage begins: the fresh optimizer
  (and fresh LR schedule, :class:`StageLRScheduler`) per stage that the original has, while frozen
  parameters hold no optimizer state. Under ``optim.frozen_tower: optimise_by_decay`` (the
  original's optimiser) it holds every student tensor instead, and a
  :class:`~kd_trainer.distill.frozen_tower.FrozenGradients` gives the frozen ones their zero
  gradients before each step (:mod:`kd_trainer.distill.frozen_tower`). Its ``state_dict`` carries
  the stage index (and which tensors have had a gradient), so the Trainer's own checkpointing saves
  and restores the right inner optimizer.
* **:class:`StageSwitcher` is the callback** that switches stages at ``on_step_begin``, forces a
  log, an evaluation and a checkpoint at every stage end, and announces each stage. Stopping exactly at a
  boundary saves stage *k*'s optimizer; on resume the first step is stage *k+1*'s, so the switch
  happens then, exactly as it does in an uninterrupted run.

DeepSpeed and FSDP build or shard the optimizer themselves, so they cannot host a staged optimizer:
a multi-stage recipe under them is refused; run the stages as separate recipes chained with
``student.checkpoint`` (continue-from) there.
"""

from __future__ import annotations

import logging
from typing import Any, Callable

import torch
from transformers import TrainerCallback

from kd_trainer.distill.frozen_tower import FrozenGradients
from kd_trainer.distill.plan import RunPlan

logger = logging.getLogger("kd_trainer")


class StageOptimizer(torch.optim.Optimizer):
    """The Trainer's optimizer for a staged run: one fresh inner optimizer per stage.

    ``build(stage_index)`` returns a new optimizer over that stage's trainable parameters. Only
    the current stage's inner optimizer exists; the previous one (and its state) is dropped when
    the next stage begins. It is a ``torch.optim.Optimizer`` so that accelerate wraps it (mixed
    precision scaling, device placement) as it would any other. ``gradients`` (a
    :class:`~kd_trainer.distill.frozen_tower.FrozenGradients`) sets the frozen tensors' gradients
    right before every step, inside it, so no caller can step without it.
    """

    def __init__(self, build: Callable[[int], torch.optim.Optimizer], stage: int = 0,  # noqa: D107
                 gradients: FrozenGradients | None = None):
        # Deliberately not calling Optimizer.__init__: the parameter groups are the inner's.
        self._build = build
        self.stage = stage
        self.gradients = gradients
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
        if self.gradients is not None:
            self.gradients.before_step(self.stage)
        return self.inner.step(closure)

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.inner.zero_grad(set_to_none=set_to_none)

    def state_dict(self) -> dict[str, Any]:  # type: ignore[override]
        state = {"stage": self.stage, "inner": self.inner.state_dict()}
        if self.gradients is not None:
            state["gradients"] = self.gradients.state_dict()
        return state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:  # type: ignore[override]
        if "stage" not in state_dict or "inner" not in state_dict:
            raise ValueError("this optimizer state was not saved by a staged run (no 'stage'/'inner' keys); "
                             "resume it with the recipe it was trained with")
        if (self.gradients is None) != ("gradients" not in state_dict):
            saved = "exclude" if "gradients" not in state_dict else "optimise_by_decay"
            raise ValueError(f"this checkpoint was trained with optim.frozen_tower: {saved} (checkpoints from before "
                             f"the key existed: exclude), and the recipe now says otherwise; resume with "
                             f"optim.frozen_tower={saved}")
        if self.gradients is not None:
            self.gradients.load_state_dict(state_dict["gradients"])
        self.begin_stage(int(state_dict["stage"]))
        self.inner.load_state_dict(state_dict["inner"])

    def __repr__(self) -> str:
        return f"StageOptimizer(stage={self.stage}, inner={self.inner!r})"


class StageLRScheduler:
    """The LR schedule of a staged run: a fresh schedule, over the stage's own length, per stage."""

    def __init__(self, optimizer: StageOptimizer, build: Callable[[int, torch.optim.Optimizer], Any]):
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


def find_wrapped(obj: Any, cls: type) -> Any:
    """Reach our staged optimizer or schedule inside accelerate's wrappers
    (``AcceleratedOptimizer.optimizer``, ``AcceleratedScheduler.scheduler``); None if absent."""
    while obj is not None and not isinstance(obj, cls):
        obj = getattr(obj, "optimizer", None) if cls is StageOptimizer else getattr(obj, "scheduler", None)
    return obj


class StageSwitcher(TrainerCallback):
    """Runs the stages of a :class:`~kd_trainer.distill.plan.RunPlan`: switches optimizer and schedule when a stage begins,
    evaluates and checkpoints when one ends, and logs which stage is running."""

    def __init__(self, plan: RunPlan):
        self.plan = plan
        self._announced: int | None = None

    def on_step_begin(self, args: Any, state: Any, control: Any, optimizer: Any = None,
                      lr_scheduler: Any = None, **kwargs: Any) -> None:
        stage = self.plan.stage_at(state.global_step)
        opt = find_wrapped(optimizer, StageOptimizer)
        if opt is not None:
            opt.begin_stage(stage.index)
        sched = find_wrapped(lr_scheduler, StageLRScheduler)
        if sched is not None:
            sched.begin_stage(stage.index)
        if self._announced != stage.index and state.is_world_process_zero:
            logger.info("stage %d/%d %r: steps %d-%d, training %s, terms %s", stage.index + 1,
                        len(self.plan.stages), stage.name, stage.start_step, stage.end_step - 1,
                        stage.trainable, [t.key for t in stage.terms])
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
