"""A retrieval run: data -> teacher -> student -> distillation -> test metrics -> open_clip export.

Everything is built from the resolved run (:class:`ResolvedRun`, decided once from the recipe):

1. log each stage's teacher source (the run's plan);
2. load the run's data (``run.data``, its splits and seed);
3. build the frozen teacher (when the run loads one: a term, a hybrid evaluation, a mimic job or
   inheritance needs it), then the student, then the named teachers, each from its ``ModelSpec``;
4. train with the plan's stages (resuming when the run says so);
5. evaluate on the test split, save the student, its metrics and the resolved recipe, and
   export it in open_clip's Hub layout (pushed when the run's Hub target asks).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import datasets
import torch
from accelerate import PartialState
from transformers import set_seed

from kd_trainer.data import load_pedes, with_retrieval_transforms
from kd_trainer.data.replay import ReplayConfig, ReplayDataset
from kd_trainer.distill.cache import TeacherCache
from kd_trainer.distill.resolved import ModelSpec, ResolvedRun
from kd_trainer.distill.retrieval import RetrievalSplit, RetrievalTrainer
from kd_trainer.models.factory import RetrievalModel, create_model
from kd_trainer.models.inherit import inherit_weights
from kd_trainer.models.loading import load_weights, model_from_checkpoint
from kd_trainer.models.precision import convert_to_irra_fp16
from kd_trainer.recipe import Recipe, RecipeError
from kd_trainer.runner.export import export_student
from kd_trainer.runner.fit import fit, log_test_metrics
from kd_trainer.synthetic.pedes import make_synth_pedes

__all__ = ["INHERITANCE_FILE", "RunData", "build_model", "open_teacher_cache", "prepare_data", "replay_config",
           "run_retrieval"]

logger = logging.getLogger("kd_trainer")

INHERITANCE_FILE = "inheritance.txt"  # where each student tensor came from, in an inherited run


@dataclass
class RunData:
    """The recipe's dataset: transformed splits, and the raw train rows a teacher cache replays."""

    splits: datasets.DatasetDict
    raw_train: datasets.Dataset

    def split(self, which: str) -> RetrievalSplit:
        """The gallery/query pair of ``which`` (val or test); datasets without val fall back to test."""
        if f"{which}_gallery" not in self.splits:
            if which == "val" and "test_gallery" in self.splits:
                logger.warning("The dataset has no val split; evaluating on test during training (as IRRA does).")
                which = "test"
            else:
                raise RecipeError(f"The dataset has no {which!r} split; it has {sorted(self.splits)}")
        return RetrievalSplit(which, self.splits[f"{which}_gallery"], self.splits[f"{which}_queries"])


def prepare_data(run: ResolvedRun) -> RunData:
    """The run's dataset with on-the-fly IRRA transforms and tokenised captions."""
    data = run.data
    if data.generator is not None:  # the schema allows it for synth_pedes only
        with PartialState().main_process_first():  # one process writes, the others wait and reuse
            make_synth_pedes(Path(data.generated), **data.generator)
    # Only the splits this run uses are loaded (and their images checked): no evaluation during
    # training, no eval split (a dataset without val records trains with evaluation off).
    wanted = {"train"} | {split for split in (run.eval_split, run.test_split) if split}
    raw = load_pedes(data.name, data.root, splits=wanted, **data.checks)
    # Seeded augmentation: the images depend only on (seed, epoch, row), so resuming is exact.
    splits = with_retrieval_transforms(raw, image_size=data.image_size, augment=data.augment,
                                       context_length=data.context_length, dataset_name=data.name, seed=run.seed)
    return RunData(splits, raw["train"])


def replay_config(run: ResolvedRun) -> ReplayConfig:
    """The augmentation a teacher cache replays (its image size, augmentation, caption length, K)."""
    if run.teacher.model is None:
        raise RecipeError("a teacher cache needs a `teacher:`")
    cache = run.teacher.model.cache
    return ReplayConfig(image_size=run.data.image_size, augment=run.data.augment,
                        context_length=run.data.context_length, num_draws=cache.draws, seed=cache.seed)


def open_teacher_cache(run: ResolvedRun, teacher: RetrievalModel,
                       raw_train: datasets.Dataset) -> tuple[TeacherCache, ReplayDataset]:
    """The run's teacher cache (``run.teacher.cache``), verified, and the train split that replays its
    augmentation draws. A cache made for another teacher, dataset or transform is refused, naming what
    changed."""
    if run.teacher.cache is None:
        raise RecipeError("this run opens no teacher cache: it needs `teacher.cache:` and a term that reads "
                          "the teacher's embeddings")
    cfg = replay_config(run)
    cache = TeacherCache.open(run.teacher.cache, teacher=teacher, dataset_raw=raw_train, transform_cfg=cfg)
    return cache, ReplayDataset(raw_train, cfg, run.data.name)


def build_model(spec: ModelSpec, run: ResolvedRun, *, projection_dim: int | None = None,
                teacher: RetrievalModel | None = None, output_dir: str | None = None) -> RetrievalModel:
    """A model of ``spec``'s architecture for the run's image size and caption length, with its
    weights: loaded from its checkpoint, or inherited from a source (the run's ``teacher``, or any
    checkpoint). An inherited model's map of where each tensor came from is written into
    ``output_dir`` (the run's folder) when one is given."""
    size, length = run.data.image_size, run.data.context_length
    # A random initialisation depends on the seed and the architecture only, not on which models
    # were built before: a student distilled from a teacher starts where the same student trained
    # alone starts.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(run.seed)
        model = create_model(spec.arch, image_size=size, context_length=length, projection_dim=projection_dim)
    if spec.checkpoint:
        # Any known format: a kd_trainer run (continue-from), open_clip/OpenAI/TinyCLIP weights
        # (position embeddings resized to this image size), a HF CLIPModel folder, IRRA's best.pth.
        load_weights(model, spec.checkpoint, irra_config=spec.config)
    elif spec.config:
        raise RecipeError("`config:` (IRRA's configs.yaml) is given without the `checkpoint:` it describes")
    inherit = spec.inherit
    if inherit is not None:
        from_teacher = inherit["source"] == "teacher"
        source = teacher if from_teacher else model_from_checkpoint(
            inherit["source"], irra_config=inherit["config"], image_size=size, context_length=length)
        if source is None:
            raise RecipeError("student.inherit.source: teacher, but the recipe has no `teacher:`")
        report = inherit_weights(model, source, layers=inherit["layers"],
                                 source_name=None if from_teacher else inherit["source"])
        if output_dir is not None and PartialState().is_main_process:
            out = Path(output_dir)
            out.mkdir(parents=True, exist_ok=True)
            (out / INHERITANCE_FILE).write_text(str(report) + "\n")
    return model


def run_retrieval(recipe: Recipe, run: ResolvedRun) -> dict[str, float]:
    """Train (if the run has epochs/steps to run) and evaluate; returns the test metrics. Everything
    is built from ``run``; ``recipe`` is only recorded beside the run (:func:`fit`)."""
    set_seed(run.seed)
    for stage in run.plan.stages:
        stage.teacher_source.log()
    data = prepare_data(run)

    # The teacher is built before the student, as it always was (the student may inherit from it).
    teacher = build_model(run.teacher.model, run) if run.teacher.load else None
    student = build_model(run.student, run, teacher=teacher, projection_dim=run.projection_dim,
                          output_dir=run.output_dir)
    if not run.teacher.in_training:
        teacher = None  # it only gave the student its weights

    if run.precision == "irra_fp16":  # the fp16 weights of IRRA's code, for both models
        for role, model in (("teacher", teacher), ("student", student)):
            if model is not None:
                logger.info("precision irra_fp16, %s: %s", role, convert_to_irra_fp16(model).summary())

    cache, train_dataset = None, data.splits["train"]
    if run.teacher.cache is not None:
        cache, train_dataset = open_teacher_cache(run, teacher, data.raw_train)

    trainer = RetrievalTrainer(
        model=student,
        args=run.args,
        plan=run.plan,
        teacher=teacher,
        mimic_jobs=run.mimic_jobs,
        mimic_teachers={name: build_model(spec, run) for name, spec in run.teachers.items()},
        teacher_cache=cache,
        max_nonfinite_skips=run.nonfinite_skips,
        exact_accumulation_steps=run.accumulation_steps,
        train_dataset=train_dataset,
        eval_dataset=data.split(run.eval_split) if run.eval_split else None,
    )
    if run.precision == "irra_fp16" and trainer.accelerator.mixed_precision != "no":
        raise RecipeError(f"precision: irra_fp16 trains fp16 weights itself, but the launch asks for "
                          f"{trainer.accelerator.mixed_precision} mixed precision (accelerate config); launch "
                          "with --mixed_precision no")
    fit(trainer, recipe, run)

    metrics: dict[str, float] = {}
    if run.test_split is not None:
        metrics = trainer.evaluate(data.split(run.test_split), metric_key_prefix="test")
        trainer.save_metrics("test", {**metrics, **({"selected": trainer.selected} if trainer.selected else {})})
        log_test_metrics(trainer, metrics)
    if trainer.is_world_process_zero():
        export_student(trainer, run)
    trainer.accelerator.wait_for_everyone()
    return metrics
