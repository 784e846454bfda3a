"""A retrieval run: data -> teacher -> student -> distillation -> test metrics -> open_clip export.

1. resolve the recipe's plan (every term, stage and weight looked up once);
2. load the data;
3. build the frozen teacher (when a term, a hybrid evaluation or a mimic job needs one) and the
   student, with their checkpoints;
4. train with the plan's stages (resuming when the recipe says so);
5. evaluate on the test split, save the student, its metrics and the resolved recipe, and
   export it in open_clip's Hub layout (pushed when the recipe asks).
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path

import datasets
import torch
from accelerate import PartialState
from transformers import set_seed

from kd_trainer.data import canonical_dataset_name, load_pedes, with_retrieval_transforms
from kd_trainer.data.replay import ReplayConfig, ReplayDataset
from kd_trainer.distill.cache import TeacherCache
from kd_trainer.distill.resolved import ResolvedRun
from kd_trainer.distill.retrieval import RetrievalSplit, RetrievalTrainer
from kd_trainer.models.factory import RetrievalModel, create_model
from kd_trainer.models.inherit import inherit_weights
from kd_trainer.models.loading import load_weights, model_from_checkpoint
from kd_trainer.models.precision import convert_to_irra_fp16
from kd_trainer.recipe import ModelConfig, Recipe, RecipeError
from kd_trainer.runner.export import export_student
from kd_trainer.runner.fit import fit
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


def prepare_data(recipe: Recipe) -> RunData:
    """The dataset with on-the-fly IRRA transforms and tokenised captions."""
    cfg = recipe.data
    name = canonical_dataset_name(cfg.name)
    if cfg.synth is not None:  # the schema allows it for synth_pedes only
        with PartialState().main_process_first():  # one process writes, the others wait and reuse
            make_synth_pedes(Path(cfg.root) / "SynthPEDES", **cfg.synth.model_dump())
    # Only the splits this run uses are loaded (and their images checked): no evaluation during
    # training, no eval split (a dataset without val records trains with evaluation off).
    during = recipe.split_evaluated_during_training
    wanted = {"train"} | ({during} if during else set()) | ({cfg.test_split} if cfg.test_split else set())
    raw = load_pedes(name, cfg.root, splits=wanted, skip_unreadable=cfg.skip_unreadable,
                     verify_images=cfg.verify_images, duplicates=cfg.duplicates)
    # Seeded augmentation: the images depend only on (seed, epoch, row), so resuming is exact.
    splits = with_retrieval_transforms(raw, image_size=tuple(cfg.image_size), augment=cfg.augment,
                                       context_length=cfg.context_length, dataset_name=name, seed=recipe.seed)
    return RunData(splits, raw["train"])


def replay_config(recipe: Recipe) -> ReplayConfig:
    """The augmentation a teacher cache replays (its image size, augmentation, caption length, K)."""
    if recipe.teacher is None:
        raise RecipeError("a teacher cache needs a `teacher:`")
    return ReplayConfig(image_size=tuple(recipe.data.image_size), augment=recipe.data.augment,
                        context_length=recipe.data.context_length, num_draws=recipe.teacher.cache_draws,
                        seed=recipe.teacher.cache_seed)


def open_teacher_cache(recipe: Recipe, teacher: RetrievalModel,
                       raw_train: datasets.Dataset) -> tuple[TeacherCache, ReplayDataset]:
    """The recipe's teacher cache, verified, and the train split that replays its augmentation
    draws. A cache made for another teacher, dataset or transform is refused, naming what changed."""
    cfg = replay_config(recipe)
    cache = TeacherCache.open(recipe.teacher.cache, teacher=teacher, dataset_raw=raw_train, transform_cfg=cfg)
    return cache, ReplayDataset(raw_train, cfg, canonical_dataset_name(recipe.data.name))


def build_model(cfg: ModelConfig, recipe: Recipe, *, projection_dim: int | None = None,
                teacher: RetrievalModel | None = None, output_dir: str | None = None) -> RetrievalModel:
    """A model of the recipe's image size and caption length, with its weights: loaded from its
    checkpoint, or inherited from a source (the recipe's ``teacher``, or any checkpoint). An
    inherited model's map of where each tensor came from is written into ``output_dir`` (the
    run's folder) when one is given."""
    size, length = tuple(recipe.data.image_size), recipe.data.context_length
    # A random initialisation depends on the seed and the architecture only, not on which models
    # were built before: a student distilled from a teacher starts where the same student trained
    # alone starts.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(recipe.seed)
        model = create_model(cfg.architecture(), image_size=size, context_length=length,
                             projection_dim=projection_dim)
    if cfg.checkpoint:
        # Any known format: a kd_trainer run (continue-from), open_clip/OpenAI/TinyCLIP weights
        # (position embeddings resized to this image size), a HF CLIPModel folder, IRRA's best.pth.
        load_weights(model, cfg.checkpoint, irra_config=cfg.config)
    elif cfg.config:
        raise RecipeError("`config:` (IRRA's configs.yaml) is given without the `checkpoint:` it describes")
    if cfg.inherit is not None:
        source = teacher if cfg.inherit.source == "teacher" else model_from_checkpoint(
            cfg.inherit.source, irra_config=cfg.inherit.config, image_size=size, context_length=length)
        if source is None:
            raise RecipeError("student.inherit.source: teacher, but the recipe has no `teacher:`")
        report = inherit_weights(model, source, layers=cfg.inherit.layers,
                                 source_name=None if cfg.inherit.source == "teacher" else cfg.inherit.source)
        if output_dir is not None and PartialState().is_main_process:
            out = Path(output_dir)
            out.mkdir(parents=True, exist_ok=True)
            (out / INHERITANCE_FILE).write_text(str(report) + "\n")
    return model


def run_retrieval(recipe: Recipe, run: ResolvedRun) -> dict[str, float]:
    """Train (if the recipe has epochs/steps to run) and evaluate; returns the test metrics."""
    set_seed(recipe.seed)
    for stage in run.plan.stages:
        stage.teacher_source.log()
    data = prepare_data(recipe)

    teacher = build_model(recipe.teacher, recipe) if run.teacher.load else None
    student = build_model(recipe.student, recipe, teacher=teacher, projection_dim=run.projection_dim,
                          output_dir=run.output_dir)
    if not run.teacher.in_training:
        teacher = None  # it only gave the student its weights

    if recipe.precision == "irra_fp16":  # the fp16 weights of IRRA's code, for both models
        for role, model in (("teacher", teacher), ("student", student)):
            if model is not None:
                logger.info("precision irra_fp16, %s: %s", role, convert_to_irra_fp16(model).summary())

    cache, train_dataset = None, data.splits["train"]
    if run.teacher.cache is not None:
        cache, train_dataset = open_teacher_cache(recipe, teacher, data.raw_train)

    trainer = RetrievalTrainer(
        model=student,
        args=run.args,
        plan=run.plan,
        teacher=teacher,
        mimic_jobs=recipe.mimic.jobs if recipe.mimic is not None else [],
        mimic_teachers={name: build_model(cfg, recipe) for name, cfg in (recipe.teachers or {}).items()},
        teacher_cache=cache,
        max_nonfinite_skips=run.nonfinite_skips,
        exact_accumulation_steps=run.accumulation_steps,
        train_dataset=train_dataset,
        eval_dataset=data.split(run.eval_split) if run.eval_split else None,
    )
    if recipe.precision == "irra_fp16" and trainer.accelerator.mixed_precision != "no":
        raise RecipeError(f"precision: irra_fp16 trains fp16 weights itself, but the launch asks for "
                          f"{trainer.accelerator.mixed_precision} mixed precision (accelerate config); launch "
                          "with --mixed_precision no")
    fit(trainer, recipe, run)

    metrics: dict[str, float] = {}
    if run.test_split is not None:
        metrics = trainer.evaluate(data.split(run.test_split), metric_key_prefix="test")
        trainer.save_metrics("test", {**metrics, **({"selected": trainer.selected} if trainer.selected else {})})
        if trainer.is_world_process_zero():
            logger.info("test metrics: %s", json.dumps(metrics))
    if trainer.is_world_process_zero():
        export_student(trainer, recipe, run.hub)
    trainer.accelerator.wait_for_everyone()
    return metrics
