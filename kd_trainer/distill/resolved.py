"""The resolved run: every decision of one run, made once from the validated recipe.

The runner resolves the recipe first (:func:`resolve_run`), builds the data and the models from
the result, and hands it to the task trainer, which executes it and decides nothing again. What
it holds, each decided here and nowhere else:

- the task (retrieval, classification, detection);
- the ``TrainingArguments`` (built once: the raw ``training:`` block is not read after this),
  and with them the output folder, the resume request and the Hub push;
- k, the micro-batches of one group under ``contrastive_accumulation: exact`` (1 otherwise);
- for a retrieval run: the plan (per stage its terms, trainable tensors, optimiser, and its
  teacher source: live, cache or none), whether the teacher model is loaded and whether it stays
  beside the student, the width of the student's projection, and the evaluation splits.

``kd-trainer plan`` prints it (:meth:`ResolvedRun.describe`).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from transformers import TrainingArguments

from kd_trainer.distill.grad_cache import exact_group_arguments
from kd_trainer.distill.plan import RunPlan
from kd_trainer.models.factory import get_architecture
from kd_trainer.recipe import Recipe

__all__ = ["HubTarget", "ResolvedRun", "TeacherUse", "resolve_run", "training_arguments"]


@dataclass(frozen=True)
class HubTarget:
    """The Hub repository the student is for (``training.hub_model_id``; named in its model card),
    and whether the exported folder is pushed there at the end (``training.push_to_hub``)."""

    repo_id: str
    push: bool = False
    token: str | None = None
    private: bool | None = None
    revision: str | None = None


@dataclass(frozen=True)
class TeacherUse:
    """What a retrieval run does with the recipe's ``teacher:``."""

    load: bool = False  # the model is built: a term, a hybrid evaluation, a mimic job or inheritance needs it
    in_training: bool = False  # it stays beside the student (else it only gave the student its weights)
    live: bool = False  # mimic jobs read its layers: every stage runs it, the cache is never read
    cache: str | None = None  # the teacher cache the run opens (only for a teacher in training)


@dataclass(frozen=True)
class ResolvedRun:
    """Every decision of one run (see the module docstring). Built by :func:`resolve_run` only."""

    task: str
    args: TrainingArguments
    accumulation_steps: int  # k: micro-batches per group with exact accumulation, else 1
    resume: str | bool | None  # a checkpoint folder, true for the latest complete one, or None
    hub: HubTarget | None
    nonfinite_skips: int
    plan: RunPlan | None = None  # retrieval only (the other tasks train their task loss and mimic jobs)
    teacher: TeacherUse = TeacherUse()
    projection_dim: int | None = None  # the teacher's width when a term compares embeddings directly
    eval_split: str | None = None  # evaluated during training (select.split, else data.eval_split), or None
    test_split: str | None = None

    @property
    def output_dir(self) -> str:
        return self.args.output_dir

    @property
    def micro_batches(self) -> int:
        """Micro-batches per optimizer step: k groups split exactly, or the Trainer's own accumulation."""
        return self.accumulation_steps * self.args.gradient_accumulation_steps

    def describe(self) -> dict[str, Any]:
        """The run-wide decisions as plain data (the per-stage ones are the plan's)."""
        return {
            "task": self.task, "output_dir": self.output_dir,
            "accumulation_steps": self.accumulation_steps,
            "resume": self.resume,
            "hub": None if self.hub is None else {"repo_id": self.hub.repo_id, "push": self.hub.push},  # no token
            "teacher": dataclasses.asdict(self.teacher), "projection_dim": self.projection_dim,
            "eval_split": self.eval_split, "test_split": self.test_split,
            "teacher_source": None if self.plan is None else {
                s.name: (s.teacher_source.message if s.teacher_source is not None else "no teacher")
                for s in self.plan.stages},
        }


def training_arguments(recipe: Recipe, *, describe_only: bool = False) -> tuple[TrainingArguments, int]:
    """The recipe's ``training:`` block as ``TrainingArguments``, and k (see :func:`exact_group_arguments`).

    ``describe_only``: for ``kd-trainer plan``, which describes a run on any machine: the arguments
    are built as for the CPU, so that a recipe asking for bf16 on GPUs is not refused by a laptop
    (the device is checked when the run starts)."""
    defaults: dict[str, Any] = {
        "output_dir": str(Path("runs") / recipe.name),
        "seed": recipe.seed,
        "report_to": "none",
        "per_device_eval_batch_size": 256,
    }
    training, k = dict(recipe.training), 1
    if recipe.contrastive_accumulation == "exact":  # the DataLoader yields whole groups; the trainer splits them
        training, k = exact_group_arguments(training)
    args = {**defaults, **training}
    args["remove_unused_columns"] = False  # transforms need the raw columns (validated in the recipe)
    if describe_only:
        args["use_cpu"] = True
    if isinstance(args.get("resume_from_checkpoint"), bool):  # `true`: fit() passes it to train()
        args.pop("resume_from_checkpoint")
    # The Trainer's own push would upload checkpoints in our training layout and swap nothing for
    # open_clip users; the runner pushes the open_clip folder instead, once, at the end.
    args["push_to_hub"] = False
    return TrainingArguments(**args), k


def resolve_run(recipe: Recipe, *, describe_only: bool = False) -> ResolvedRun:
    """Decide everything the recipe leaves to the run, once (``describe_only``: for ``kd-trainer
    plan``, on a machine that need not be the run's; see :func:`training_arguments`)."""
    args, k = training_arguments(recipe, describe_only=describe_only)
    training = recipe.training  # read here, once; the run reads `args` and this object after
    hub = None
    if training.get("hub_model_id"):
        hub = HubTarget(training["hub_model_id"], bool(training.get("push_to_hub")), training.get("hub_token"),
                        training.get("hub_private_repo"), training.get("hub_revision"))
    common = dict(task=recipe.task, args=args, accumulation_steps=k,
                  resume=training.get("resume_from_checkpoint") or None, hub=hub,
                  nonfinite_skips=recipe.nonfinite_skips)
    if recipe.task != "retrieval":
        return ResolvedRun(**common)
    plan = RunPlan.from_recipe(recipe)
    cfg = recipe.teacher
    jobs = recipe.mimic.jobs if recipe.mimic is not None else []
    live = cfg is not None and any("teacher" in job.teachers for job in jobs)
    in_training = cfg is not None and (plan.wants_teacher or live)
    inherits = recipe.student.inherit is not None and recipe.student.inherit.source == "teacher"
    teacher = TeacherUse(load=in_training or (cfg is not None and inherits), in_training=in_training, live=live,
                         cache=cfg.cache if in_training and cfg.cache is not None else None)
    plan.place_teacher(cache=teacher.cache is not None, live=live)
    projection = None
    if teacher.load and plan.direct_compare:  # the built teacher has its architecture's width
        projection = int(get_architecture(cfg.architecture())["embed_dim"])
    return ResolvedRun(**common, plan=plan, teacher=teacher, projection_dim=projection,
                       eval_split=recipe.split_evaluated_during_training,
                       test_split=recipe.data.test_split)
