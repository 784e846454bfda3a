"""The resolved run: every decision of one run, made once from the validated recipe.

The runner resolves the recipe first (:func:`resolve_run`), builds the data and the models from
the result, and hands it to the task trainer, which executes it and decides nothing again. What
it holds, each decided here and nowhere else:

- the task (retrieval, classification, detection), the run's name and seed;
- the data set the task runs on, and the generator (with its arguments) that writes it
  (:class:`DataSpec`);
- the student and the named teachers the task loads, each an architecture (derived keys applied)
  and a checkpoint (:class:`ModelSpec`; ``teachers:``, and for classification ``teacher:`` when a
  job names it), and a retrieval ``teacher:``'s cache settings (:class:`CacheSpec`);
- the mimic jobs (which teacher, which layers, the loss, the weight and warm-up as parsed) and
  whether the task loss is kept;
- the ``TrainingArguments`` (built once: the raw ``training:`` block is not read after this),
  and with them the output folder, the resume request and the Hub push;
- k, the micro-batches of one group under ``contrastive_accumulation: exact`` (1 otherwise);
- for a retrieval run: the plan (per stage its terms, trainable tensors, optimiser, and its
  teacher source: live, cache or none), whether the teacher model is loaded and whether it stays
  beside the student, the width of the student's projection, and the evaluation splits.

``kd-trainer plan`` prints it, and every run saves it as ``resolved_run.json`` in its output folder
(:meth:`ResolvedRun.describe`: plain JSON, never the Hub token).
"""

from __future__ import annotations

import copy
import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from transformers import TrainingArguments

from kd_trainer.data import canonical_dataset_name
from kd_trainer.distill.grad_cache import exact_group_arguments
from kd_trainer.distill.plan import RunPlan, Stage
from kd_trainer.models.factory import get_architecture
from kd_trainer.recipe import MimicJob, ModelConfig, Recipe

__all__ = ["RESOLVED_RUN_FILE", "CacheSpec", "DataSpec", "HubTarget", "ModelSpec", "ResolvedRun", "TeacherUse",
           "arg_name", "resolve_data", "resolve_run", "resolve_teachers", "training_arguments"]

RESOLVED_RUN_FILE = "resolved_run.json"  # describe(), saved in the output folder when a run starts

# The generated data sets: data.name -> (the recipe's block of generator arguments, the folder under data.root).
GENERATED = {"synth_pedes": ("synth", "SynthPEDES"), "synth_shapes": ("shapes", "SynthShapes"),
             "synth_det": ("det", "SynthDet")}


@dataclass(frozen=True)
class CacheSpec:
    """A retrieval ``teacher:``'s cache settings: the folder (``teacher.cache``; None: none named),
    and the augmentation draws per image it holds and their seed (``cache_draws``, ``cache_seed``)."""

    path: str | None
    draws: int
    seed: int


@dataclass(frozen=True)
class ModelSpec:
    """A model the run builds: its architecture (a name, or the architecture as a dict, derived
    keys applied) and the checkpoint it loads (None: a random initialisation)."""

    arch: str | dict[str, Any]
    checkpoint: str | None = None
    config: str | None = None  # IRRA's configs.yaml beside an IRRA checkpoint (retrieval only)
    inherit: dict[str, Any] | None = None  # the student's weight inheritance: source, config and layers
    cache: CacheSpec | None = None  # a retrieval `teacher:`'s cache settings (None for every other model)

    @classmethod
    def of(cls, cfg: ModelConfig, *, cache: bool = False) -> ModelSpec:
        """The recipe's model block, copied (``cache``: with its cache settings, a retrieval ``teacher:``)."""
        return cls(copy.deepcopy(cfg.architecture()), cfg.checkpoint, cfg.config,
                   cfg.inherit.model_dump() if cfg.inherit is not None else None,
                   CacheSpec(cfg.cache, cfg.cache_draws, cfg.cache_seed) if cache else None)


@dataclass(frozen=True)
class DataSpec:
    """The data set a run trains and tests on."""

    name: str  # canonical: cuhk_pedes, icfg_pedes, rstpreid, synth_pedes, synth_shapes, synth_det
    root: str
    generated: str | None = None  # the folder the generator writes (or reuses), None: a data set on disk
    generator: dict[str, Any] | None = None  # the generator's arguments (data.synth, data.shapes, data.det)
    num_classes: int | None = None  # classification and detection
    image_size: int | tuple[int, int] | None = None  # (height, width) for retrieval; a square side otherwise
    context_length: int | None = None  # caption tokens (retrieval)
    checks: dict[str, Any] | None = None  # retrieval: verify_images, skip_unreadable, duplicates
    augment: bool | None = None  # retrieval: IRRA's augmentation of the train images (and of a cache's draws)


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
    model: ModelSpec | None = None  # the recipe's `teacher:` (built only when `load`)


@dataclass(frozen=True)
class ResolvedRun:
    """Every decision of one run (see the module docstring). Built by :func:`resolve_run` only."""

    task: str
    name: str
    method: str | None
    seed: int
    args: TrainingArguments
    accumulation_steps: int  # k: micro-batches per group with exact accumulation, else 1
    contrastive_accumulation: str  # plain or exact
    resume: str | bool | None  # a checkpoint folder, true for the latest complete one, or None
    overwrite: bool  # training.overwrite_output_dir: the run may replace a run already in output_dir
    hub: HubTarget | None
    nonfinite_skips: int
    data: DataSpec
    student: ModelSpec
    teachers: dict[str, ModelSpec]  # the named teachers the mimic jobs read (retrieval: beside `teacher`)
    mimic_jobs: tuple[MimicJob, ...] = ()
    task_loss: bool = True  # the task's own loss (cross-entropy, the detector's losses) is trained
    precision: str | None = None  # retrieval: irra_fp16 (IRRA's fp16 weights), or None (fp32 weights)
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

    @property
    def checkpoint_kept(self) -> str:
        """Which weights the run keeps as its result."""
        select = self.plan.select if self.plan is not None else None
        if select is None:
            return "the last weights" + (" of the last stage" if self.plan is not None else "")
        return (f"the epoch of the last stage with the best {select.metric} on {select.split}"
                + (" (test-set selection, as the original)" if select.split == "test" else ""))

    def describe(self) -> dict[str, Any]:
        """Every decision as plain JSON data: what ``kd-trainer plan`` prints and ``resolved_run.json``
        holds. The per-stage tensors are the plan's, bound to the student when it is built; the Hub
        token is never in it."""
        a = self.args
        out: dict[str, Any] = {
            "name": self.name, "method": self.method, "task": self.task, "seed": self.seed,
            "output_dir": self.output_dir,
            "training": {
                "length": "each stage's own (stages)" if self.plan is not None and any(
                    s.epochs or s.steps for s in self.plan.stages) else f"{a.max_steps} steps" if a.max_steps > 0
                else f"{a.num_train_epochs:g} epochs",
                "per_device_train_batch_size": a.per_device_train_batch_size,
                "gradient_accumulation_steps": a.gradient_accumulation_steps, "optim": arg_name(a.optim),
                "learning_rate": a.learning_rate, "weight_decay": a.weight_decay,
                "lr_scheduler_type": arg_name(a.lr_scheduler_type), "warmup_steps": a.warmup_steps,
                "max_grad_norm": a.max_grad_norm,
                "mixed_precision": "bf16" if a.bf16 else "fp16" if a.fp16 else None,
                "eval_strategy": arg_name(a.eval_strategy), "save_strategy": arg_name(a.save_strategy)},
            "accumulation": {"mode": self.contrastive_accumulation, "k": self.accumulation_steps,
                             "micro_batches_per_step": self.micro_batches},
            "resume": self.resume, "overwrite_output_dir": self.overwrite,
            "hub": None if self.hub is None else {"repo_id": self.hub.repo_id, "push": self.hub.push},  # no token
            "nonfinite_skips": self.nonfinite_skips,
            "data": dataclasses.asdict(self.data),
            "student": dataclasses.asdict(self.student),
            "teachers": {n: dataclasses.asdict(t) for n, t in self.teachers.items()},
            "task_loss": self.task_loss,
            "mimic_jobs": [_job(j) for j in self.mimic_jobs],
            "checkpoint_kept": self.checkpoint_kept,
        }
        if self.plan is not None:
            out.update({
                "precision": {"mode": self.precision or "fp32 weights",
                              "mixed": out["training"]["mixed_precision"]},
                "teacher": dataclasses.asdict(self.teacher), "projection_dim": self.projection_dim,
                "eval_split": self.eval_split, "test_split": self.test_split,
                "select": None if self.plan.select is None else self.plan.select.model_dump(),
                "stages": [_stage(s) for s in self.plan.stages]})
        return json.loads(json.dumps(out))  # plain data: tuples as lists, as the saved file reads back


def arg_name(value: Any) -> str:
    """An enum field of ``TrainingArguments`` (optim, lr_scheduler_type) as the string a recipe gives."""
    return str(getattr(value, "value", value))


def _schedule(value: Any) -> Any:
    """A weight or alpha: a number, or its schedule as data."""
    return value if value is None or isinstance(value, (int, float)) else value.model_dump()


def _job(job: MimicJob) -> dict[str, Any]:
    """One mimic job as data: its teachers and layers, paired in order with the student's, its loss,
    its weight after the warm-up, the warm-up in global steps, how teachers combine, its adapters."""
    return {"name": job.name, "student": list(job.student),
            "teachers": {t: list(taps) for t, taps in job.teachers.items()},
            "loss": job.loss.type, "loss_kwargs": job.loss.kwargs, "weight": job.loss_weight,
            "warm_up_iters": job.warm_up_iters, "reduce": job.reduce, "adapter": job.adapter}


def _stage(s: Stage) -> dict[str, Any]:
    """One stage's decisions before a model exists (the trainable tensors are bound to the student later)."""
    return {
        "name": s.name, "epochs": s.epochs, "steps": s.steps, "trains": s.trainable,
        "terms": [{"key": t.key, "side": t.config.side, "temperature": t.temperature, "group": t.group,
                   "weight": _schedule(t.config.weight), "kwargs": t.config.kwargs} for t in s.terms],
        "alpha": _schedule(s.alpha), "learning_rate": s.learning_rate,
        "optimiser": "trainer" if s.optim is None else {"preset": "irra", **dataclasses.asdict(s.optim)},
        "eval_hybrids": list(s.eval_hybrids),
        "teacher_source": s.teacher_source.message if s.teacher_source is not None else "no teacher",
    }


def _has_accelerator() -> bool:
    """A CUDA GPU, an Ascend NPU (torch_npu registers it) or another accelerator torch can use."""
    probe = getattr(torch, "accelerator", None)
    if probe is not None and hasattr(probe, "is_available"):
        return bool(probe.is_available())
    return torch.cuda.is_available()


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
        # Pinned memory speeds copies to an accelerator; without one, torch warns on every DataLoader.
        "dataloader_pin_memory": _has_accelerator(),
    }
    training, k = dict(recipe.training), 1
    training.pop("overwrite_output_dir", None)  # kd_trainer's own key (ResolvedRun.overwrite)
    # Exact accumulation (retrieval only): the DataLoader yields whole groups; the trainer splits them.
    if recipe.task == "retrieval" and recipe.contrastive_accumulation == "exact":
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


def resolve_data(recipe: Recipe) -> DataSpec:
    """The data set of the recipe's task, and the generator that writes it when it is generated."""
    cfg = recipe.data
    if recipe.task == "retrieval":
        name = canonical_dataset_name(cfg.name)
        generator = cfg.synth.model_dump() if cfg.synth is not None else None
        checks = {"verify_images": cfg.verify_images, "skip_unreadable": cfg.skip_unreadable,
                  "duplicates": cfg.duplicates}
        return DataSpec(name, cfg.root, str(Path(cfg.root) / GENERATED[name][1])
                        if generator is not None and name in GENERATED else None,
                        generator, image_size=tuple(cfg.image_size), context_length=cfg.context_length,
                        checks=checks, augment=cfg.augment)
    block, folder = GENERATED[cfg.name]  # the schema gave classification synth_shapes, detection synth_det
    generator = getattr(cfg, block).model_dump()
    return DataSpec(cfg.name, cfg.root, str(Path(cfg.root) / folder), generator,
                    num_classes=generator["num_classes"], image_size=generator["image_size"])


def resolve_teachers(recipe: Recipe) -> dict[str, ModelSpec]:
    """The named teachers the mimic jobs read: ``teachers:`` (their checkpoints with UP's
    ``teacher_weight`` applied by the schema), and for classification ``teacher:`` as ``"teacher"``
    when a job names it (a retrieval run's ``teacher:`` is :class:`TeacherUse`'s; a detection recipe
    has none)."""
    named = {name: ModelSpec.of(cfg) for name, cfg in (recipe.teachers or {}).items()}
    jobs = recipe.mimic.jobs if recipe.mimic is not None else []
    one = getattr(recipe, "teacher", None) if recipe.task != "retrieval" else None
    if one is not None and any("teacher" in j.teachers for j in jobs):
        named["teacher"] = ModelSpec.of(one)
    return named


def resolve_run(recipe: Recipe, *, describe_only: bool = False) -> ResolvedRun:
    """Decide everything the recipe leaves to the run, once (``describe_only``: for ``kd-trainer
    plan``, on a machine that need not be the run's; see :func:`training_arguments`)."""
    args, k = training_arguments(recipe, describe_only=describe_only)
    training = recipe.training  # read here, once; the run reads `args` and this object after
    hub = None
    if training.get("hub_model_id"):
        hub = HubTarget(training["hub_model_id"], bool(training.get("push_to_hub")), training.get("hub_token"),
                        training.get("hub_private_repo"), training.get("hub_revision"))
    mimic = recipe.mimic
    jobs = tuple(j.model_copy(deep=True) for j in mimic.jobs) if mimic is not None else ()
    common = dict(task=recipe.task, name=recipe.name, method=recipe.method, seed=recipe.seed, args=args,
                  accumulation_steps=k, contrastive_accumulation="plain",
                  resume=training.get("resume_from_checkpoint") or None, hub=hub,
                  overwrite=bool(training.get("overwrite_output_dir")),
                  nonfinite_skips=recipe.nonfinite_skips, data=resolve_data(recipe),
                  student=ModelSpec.of(recipe.student), teachers=resolve_teachers(recipe), mimic_jobs=jobs,
                  task_loss=mimic.task_loss if mimic is not None else True)
    if recipe.task != "retrieval":  # the keys below are a retrieval recipe's
        return ResolvedRun(**common)
    common["contrastive_accumulation"] = recipe.contrastive_accumulation
    plan = RunPlan.from_recipe(recipe)
    cfg = recipe.teacher
    live = cfg is not None and any("teacher" in job.teachers for job in jobs)
    in_training = cfg is not None and (plan.wants_teacher or live)
    inherits = recipe.student.inherit is not None and recipe.student.inherit.source == "teacher"
    teacher = TeacherUse(load=in_training or (cfg is not None and inherits), in_training=in_training, live=live,
                         cache=cfg.cache if in_training and cfg.cache is not None else None,
                         model=ModelSpec.of(cfg, cache=True) if cfg is not None else None)
    plan.place_teacher(cache=teacher.cache is not None, live=live)
    projection = None
    if teacher.load and plan.direct_compare:  # the built teacher has its architecture's width
        projection = int(get_architecture(cfg.architecture())["embed_dim"])
    return ResolvedRun(**common, precision=recipe.precision, plan=plan, teacher=teacher, projection_dim=projection,
                       eval_split=recipe.split_evaluated_during_training,
                       test_split=recipe.data.test_split)
