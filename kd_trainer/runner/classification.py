"""The classification example: SynthShapes, torchvision classifiers, cross-entropy plus the recipe's
mimic jobs from its named teachers."""

from __future__ import annotations

from pathlib import Path

from accelerate import PartialState
from transformers import set_seed

from kd_trainer.data.shapes import ShapesDataset
from kd_trainer.distill.classification import ClassificationTrainer
from kd_trainer.distill.resolved import ResolvedRun
from kd_trainer.models.classifier import load_classifier
from kd_trainer.recipe import Recipe
from kd_trainer.runner.fit import fit
from kd_trainer.synthetic.shapes import make_synth_shapes

__all__ = ["run_classification"]


def run_classification(recipe: Recipe, run: ResolvedRun) -> dict[str, float]:
    """The classification example: SynthShapes, torchvision classifiers, cross-entropy plus the
    recipe's UP/EOD mimic jobs from its named teachers. Same recipe, trainer core and logging."""
    set_seed(recipe.seed)
    folder = Path(recipe.data.root) / "SynthShapes"
    with PartialState().main_process_first():
        make_synth_shapes(folder, **recipe.data.shapes.model_dump())
    train, test = ShapesDataset(folder, "train", train=True), ShapesDataset(folder, "test", train=False)
    classes = recipe.data.shapes.num_classes
    teachers = {name: load_classifier(str(cfg.arch), classes, cfg.checkpoint)
                for name, cfg in (recipe.teachers or {}).items()}
    mimic = recipe.mimic
    student = load_classifier(str(recipe.student.arch), classes, recipe.student.checkpoint)
    trainer = ClassificationTrainer(model=student, args=run.args, teachers=teachers,
                                    mimic_jobs=mimic.jobs if mimic else (),
                                    task_loss=mimic.task_loss if mimic else True,
                                    max_nonfinite_skips=run.nonfinite_skips, train_dataset=train, eval_dataset=test)
    fit(trainer, recipe, run)
    metrics = trainer.evaluate(test, metric_key_prefix="test")
    trainer.save_metrics("test", metrics)
    return metrics
